"""Plays the Job controller and the kubelet against the test API server.

For each Job it creates pods; for each pod it checks capacity (extended resources such
as nvidia.com/gpu), pretends to pull the image (`unpullable` images never pull), then
runs the container's command as a subprocess with the pod's volumes mapped to
directories: a PersistentVolumeClaim to one directory per claim (so the data outlives
pods, as on a real volume), a ConfigMap to its files, an emptyDir to a scratch
directory. Paths under a mount in the command, working directory and environment are
translated to those directories. It writes pod and Job status as the process runs and
exits: phases, exit codes, termination messages (FallbackToLogsOnError included),
OOMKilled and DisruptionTarget, and the Job's podFailurePolicy, backoffLimit,
activeDeadlineSeconds, ttlSecondsAfterFinished and suspend semantics. A container whose
environment names a missing Secret or ConfigMap key waits in CreateContainerConfigError,
as the kubelet's does, until it exists. `hold` freezes a container's processes (a pod that stays
Running, e.g. across an operator restart) until `release`.

It also plays Kueue for the queues a test opens (`open_queue`): a Job with the
kueue.x-k8s.io/queue-name label of an open queue is admitted, and Kueue unsuspends any
suspended Job whose workload is admitted, also one someone suspended again.

And the namespace's ResourceQuota on extended resources (`set_quota`, e.g. requests.nvidia.com/gpu):
a pod that would exceed it is refused, and the Job controller posts a FailedCreate Event on the Job,
in the API server's words, and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tests.operator.emulator import ApiError, ApiServer, merge_patch, now_iso

POD_RESOURCES = ("", "pods")
JOB_RESOURCES = ("batch", "jobs")


def quota_refusal(what: str, key: str, requested: int, used: int, hard: int, quota: str = "gpu-quota") -> str:
    """The API server's words when ResourceQuota `quota` refuses `what` (e.g. 'pods "x"')."""
    return (
        f"{what} is forbidden: exceeded quota: {quota}, requested: {key}={requested}, used: {key}={used}, "
        f"limited: {key}={hard}"
    )


def failed_create(server: ApiServer, job: dict[str, Any], message: str) -> None:
    """The Job controller's Event for a pod it could not create (aggregated: the same message again counts one
    more on the Event). Call on the server's loop (ApiServer.call)."""
    meta = job["metadata"]
    events = server.resource("", "events")
    found = server.list(events, meta["namespace"], fields=f"involvedObject.uid={meta['uid']},reason=FailedCreate")
    text = f"Error creating: {message}"
    if found and found[-1].get("message") == text:
        counted = lambda o: {**o, "count": o.get("count", 1) + 1, "lastTimestamp": now_iso()}  # noqa: E731
        server.update(events, meta["namespace"], found[-1]["metadata"]["name"], counted)
        return
    involved = {"kind": "Job", "apiVersion": "batch/v1", "namespace": meta["namespace"], "name": meta["name"]}
    server.create(
        events,
        meta["namespace"],
        {
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}"},
            "involvedObject": {**involved, "uid": meta["uid"], "resourceVersion": meta["resourceVersion"]},
            "reason": "FailedCreate",
            "type": "Warning",
            "message": text,
            "count": 1,
            "firstTimestamp": now_iso(),
            "lastTimestamp": now_iso(),
            "source": {"component": "job-controller"},
            "reportingComponent": "job-controller",
        },
    )


@dataclass
class Process:
    pod: str  # namespace/name
    proc: asyncio.subprocess.Process
    log: Path
    termination: Path
    kill_reason: str | None = None  # set when the runner kills it: OOMKilled


@dataclass
class JobRunner:
    server: ApiServer
    root: Path
    capacity: dict[str, int] = field(default_factory=lambda: {"nvidia.com/gpu": 0})
    unpullable: tuple[str, ...] = ("does-not-exist",)  # image names containing these never pull
    # Uppercase is not allowed in image references: the kubelet reports InvalidImageName at once.
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every container
    instant: bool = False  # pods succeed at once without running anything (for scale benchmarks)
    open_queues: set[str] = field(default_factory=set)  # Kueue LocalQueues that admit every workload
    quota: dict[str, int] = field(default_factory=dict)  # hard limits of a ResourceQuota, e.g. requests.nvidia.com/gpu
    processes: dict[str, Process] = field(default_factory=dict)  # pod uid -> process
    _jobs: dict[str, asyncio.Task] = field(default_factory=dict)
    _pods: dict[str, asyncio.Task] = field(default_factory=dict)
    _wake: dict[str, asyncio.Event] = field(default_factory=dict)
    _counted: set[str] = field(default_factory=set)
    _create_failed: set[str] = field(default_factory=set)  # uids of Jobs whose last pod creation was refused

    # ------------------------------------------------------------------ wiring

    def start(self) -> JobRunner:
        def hook(kind: str, res: Any, obj: dict[str, Any]) -> None:
            if res.key == JOB_RESOURCES:
                self._on_job(kind, obj)
            elif res.key == POD_RESOURCES:
                self._on_pod(kind, obj)

        self.server.call(lambda: self.server.subscribers.append(hook))
        return self

    def stop(self) -> None:
        async def stop_all() -> None:
            for task in [*self._jobs.values(), *self._pods.values()]:
                task.cancel()
            for process in self.processes.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.proc.pid, signal.SIGKILL)

        self.server.call(stop_all())

    def _poke(self, key: str) -> None:
        if key in self._wake:
            self._wake[key].set()

    def _on_job(self, kind: str, job: dict[str, Any]) -> None:
        uid = job["metadata"]["uid"]
        if kind != "DELETED" and uid not in self._jobs:
            self._wake[uid] = asyncio.Event()
            self._jobs[uid] = asyncio.get_running_loop().create_task(self._control(job))
        self._poke(uid)

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        owner = next((r["uid"] for r in meta.get("ownerReferences") or [] if r.get("kind") == "Job"), None)
        if owner:
            self._poke(owner)
        if kind == "ADDED" and meta["uid"] not in self._pods:
            self._wake[meta["uid"]] = asyncio.Event()
            self._pods[meta["uid"]] = asyncio.get_running_loop().create_task(self._kubelet(pod))
        else:
            self._poke(meta["uid"])
        if kind == "DELETED":  # capacity freed: pending pods may fit now
            for other in list(self._pods):
                self._poke(other)

    # ------------------------------------------------------------------ test controls (any thread)

    def set_capacity(self, resource: str, amount: int) -> None:
        def change() -> None:
            self.capacity[resource] = amount
            for uid in list(self._pods):
                self._poke(uid)

        self.server.call(change)

    def set_quota(self, resource: str, hard: int | None) -> None:
        """The namespace's ResourceQuota `gpu-quota` limits `resource` (requests.nvidia.com/gpu) to `hard`;
        None removes the limit."""

        def change() -> None:
            if hard is None:
                self.quota.pop(resource, None)
            else:
                self.quota[resource] = hard
            for uid in list(self._jobs):
                self._poke(uid)

        self.server.call(change)

    def open_queue(self, name: str) -> None:
        """Kueue admits the workloads of this queue from now on."""

        def change() -> None:
            self.open_queues.add(name)
            for uid in list(self._jobs):
                self._poke(uid)

        self.server.call(change)

    def evict(self, namespace: str, pod: str) -> None:
        """What the eviction API, a preemption or a node drain does: DisruptionTarget, then a graceful delete."""

        def evict() -> None:
            res = self.server.resource(*POD_RESOURCES)
            condition = {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "EvictionByEvictionAPI",
                "message": "Eviction API: evicting",
                "lastTransitionTime": now_iso(),
            }
            self.server.update(res, namespace, pod, lambda o: _with_condition(o, condition), "status")
            self.server.delete(res, namespace, pod, graceful=True)

        self.server.call(evict)

    def oom_kill(self, namespace: str, pod: str) -> None:
        """What the kernel does to a container over its memory limit."""

        def kill() -> None:
            uid = self.server.get(self.server.resource(*POD_RESOURCES), namespace, pod)["metadata"]["uid"]
            process = self.processes[uid]
            process.kill_reason = "OOMKilled"
            os.killpg(process.proc.pid, signal.SIGKILL)

        self.server.call(kill)

    def crash(self, namespace: str, pod: str) -> None:
        """A container that dies on its own (segfault, killed): exit 137, reason Error."""

        def kill() -> None:
            uid = self.server.get(self.server.resource(*POD_RESOURCES), namespace, pod)["metadata"]["uid"]
            os.killpg(self.processes[uid].proc.pid, signal.SIGKILL)

        self.server.call(kill)

    def hold(self, namespace: str, pod: str) -> None:
        """Freeze the container's processes (SIGSTOP), e.g. a trainer in a long step: the pod stays Running and
        signals (a deletion's SIGTERM) wait until `release`. Release within the pod's grace period."""
        self._signal(namespace, pod, signal.SIGSTOP)

    def release(self, namespace: str, pod: str) -> None:
        self._signal(namespace, pod, signal.SIGCONT)

    def _signal(self, namespace: str, pod: str, sig: signal.Signals) -> None:
        def send() -> None:
            process = next(p for p in self.processes.values() if p.pod == f"{namespace}/{pod}")
            os.killpg(process.proc.pid, sig)

        self.server.call(send)

    def pod_log(self, namespace: str, pod: str) -> str:
        """The container's output, also after the pod is gone (like `kubectl logs --previous`)."""
        process = next((p for p in list(self.processes.values()) if p.pod == f"{namespace}/{pod}"), None)
        return process.log.read_text(errors="replace") if process else ""

    def volume(self, namespace: str, claim: str) -> Path:
        return self.root / "volumes" / namespace / claim

    # ------------------------------------------------------------------ the Job controller

    async def _control(self, job: dict[str, Any]) -> None:
        meta = job["metadata"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        jobs, pods = self.server.resource(*JOB_RESOURCES), self.server.resource(*POD_RESOURCES)
        while True:
            self._wake[uid].clear()
            try:
                job = self.server.get(jobs, ns, name)
            except ApiError:
                return
            if job["metadata"]["uid"] != uid:
                return
            self._step(job, jobs, pods)
            job = self.server.objects[jobs.key].get((ns, name))
            if job is None:
                return
            status = job.get("status") or {}
            wait = None
            ttl = job["spec"].get("ttlSecondsAfterFinished")
            if (ended := _finished_at(status)) is not None and ttl is not None and not self._active(job, pods):
                # The TTL controller: counted from the Job's end, whenever the TTL was set.
                wait = ttl - (datetime.now(timezone.utc) - ended).total_seconds()
                if wait <= 0:
                    with contextlib.suppress(ApiError):
                        self.server.delete(jobs, ns, name)
                    return
            deadline = job["spec"].get("activeDeadlineSeconds")
            if ended is None and deadline and status.get("startTime") and not job["spec"].get("suspend"):
                started = datetime.fromisoformat(status["startTime"].replace("Z", "+00:00"))
                wait = max(0.05, deadline - (datetime.now(timezone.utc) - started).total_seconds())
            if uid in self._create_failed:  # the Job controller retries a refused pod
                wait = min(wait or 1.0, 1.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake[uid].wait(), wait)

    def _active(self, job: dict[str, Any], pods: Any) -> list[dict[str, Any]]:
        return [
            p
            for p in self.server.list(pods, job["metadata"]["namespace"], f"job-name={job['metadata']['name']}")
            if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
        ]

    def _kueue(self, job: dict[str, Any], jobs: Any) -> dict[str, Any]:
        """Kueue: an admitted workload's Job runs; a suspended one is unsuspended, whoever suspended it."""
        queue = (job["metadata"].get("labels") or {}).get("kueue.x-k8s.io/queue-name")
        status = job.get("status") or {}
        finished = _condition(status, "Complete") or _condition(status, "Failed")
        if queue in self.open_queues and job["spec"].get("suspend") and not finished:
            meta = job["metadata"]
            return self.server.update(
                jobs, meta["namespace"], meta["name"], lambda o: merge_patch(o, {"spec": {"suspend": False}})
            )
        return job

    def _step(self, job: dict[str, Any], jobs: Any, pods: Any) -> None:
        job = self._kueue(job, jobs)
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        spec, status = job["spec"], dict(job.get("status") or {})
        finished = _condition(status, "Complete") or _condition(status, "Failed")
        owned = self.server.list(pods, ns, f"job-name={name}")
        active = [p for p in owned if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
        conditions = list(status.get("conditions") or [])

        # Account for pods that ended.
        for pod in owned:
            uid, phase = pod["metadata"]["uid"], pod.get("status", {}).get("phase")
            if phase not in ("Succeeded", "Failed") or uid in self._counted or finished:
                continue
            self._counted.add(uid)
            if pod["metadata"].get("annotations", {}).get("kubetune.test/suspended"):
                continue  # a Job's suspension is not a pod failure
            if phase == "Succeeded":
                status["succeeded"] = status.get("succeeded", 0) + 1
                conditions.append(_new_condition("Complete", "", "Reached expected number of succeeded pods"))
                status["completionTime"] = now_iso()
                finished = True
                continue
            action, index = _policy_action(spec.get("podFailurePolicy"), pod)
            if action == "Ignore":
                continue
            if action == "FailJob":
                code = _exit_code(pod)
                conditions.append(
                    _new_condition(
                        "Failed",
                        "PodFailurePolicy",
                        f"Container trainer for pod {ns}/{pod['metadata']['name']} failed "
                        f"with exit code {code} matching FailJob rule at index {index}",
                    )
                )
                status["failed"] = status.get("failed", 0) + 1
                finished = True
                continue
            status["failed"] = status.get("failed", 0) + 1
            if status["failed"] > spec.get("backoffLimit", 6):
                conditions.append(
                    _new_condition("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
                )
                finished = True

        deadline = spec.get("activeDeadlineSeconds")
        if not finished and deadline and status.get("startTime") and not spec.get("suspend"):
            started = datetime.fromisoformat(status["startTime"].replace("Z", "+00:00"))
            if (datetime.now(timezone.utc) - started).total_seconds() >= deadline:
                conditions.append(
                    _new_condition("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
                )
                finished = True

        suspended_now = bool(spec.get("suspend")) and not finished
        if finished or suspended_now:
            for pod in active:
                if suspended_now:
                    self.server.update(
                        pods,
                        ns,
                        pod["metadata"]["name"],
                        lambda o: merge_patch(o, {"metadata": {"annotations": {"kubetune.test/suspended": "true"}}}),
                    )
                with contextlib.suppress(ApiError):
                    self.server.delete(pods, ns, pod["metadata"]["name"], graceful=True)
        was_suspended = _condition(status, "Suspended")
        if suspended_now and not was_suspended:
            conditions = [x for x in conditions if x["type"] != "Suspended"]
            conditions.append(_new_condition("Suspended", "JobSuspended", "Job suspended"))
        elif not suspended_now and was_suspended:
            conditions = [x for x in conditions if x["type"] != "Suspended"]
            conditions.append({**_new_condition("Suspended", "JobResumed", "Job resumed"), "status": "False"})
            status.pop("startTime", None)  # a resumed Job's deadline counts from now, as in Kubernetes

        if not finished and not suspended_now and not active:
            status.setdefault("startTime", now_iso())
            if self._create_pod(job, pods):
                active = [True]

        status["active"] = len([p for p in active if p is True or not p["metadata"].get("deletionTimestamp")])
        status["conditions"] = conditions
        self.server.update(jobs, ns, name, lambda o: {**o, "status": status}, "status")

    def _over_quota(self, job: dict[str, Any], pods: Any, name: str) -> str | None:
        """The API server's refusal of a pod that would exceed the quota, or None."""
        if not self.quota:
            return None
        ns = job["metadata"]["namespace"]

        def requests(pod_spec: dict[str, Any]) -> dict[str, int]:
            out: dict[str, int] = {}
            for container in pod_spec.get("containers") or []:
                for key, value in ((container.get("resources") or {}).get("requests") or {}).items():
                    if "/" in key:
                        out[f"requests.{key}"] = out.get(f"requests.{key}", 0) + int(value)
            return out

        wanted = requests(job["spec"]["template"]["spec"])
        used: dict[str, int] = {}
        for pod in self.server.list(pods, ns):
            if pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
                for key, value in requests(pod["spec"]).items():
                    used[key] = used.get(key, 0) + value
        for key, hard in self.quota.items():
            if key in wanted and used.get(key, 0) + wanted[key] > hard:
                return quota_refusal(f'pods "{name}"', key, wanted[key], used.get(key, 0), hard)
        return None

    def _create_pod(self, job: dict[str, Any], pods: Any) -> bool:
        """Create the Job's next pod; False when the API server refuses it (a FailedCreate Event says why)."""
        template = job["spec"]["template"]
        meta = job["metadata"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{meta['name']}-{uuid.uuid4().hex[:5]}",
                "labels": {
                    **(template.get("metadata", {}).get("labels") or {}),
                    "job-name": meta["name"],
                    "controller-uid": meta["uid"],
                },
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": template["spec"],
        }
        if (refused := self._over_quota(job, pods, pod["metadata"]["name"])) is not None:
            failed_create(self.server, job, refused)
            self._create_failed.add(meta["uid"])  # tried again soon, as the Job controller does with backoff
            return False
        self._create_failed.discard(meta["uid"])
        created = self.server.create(pods, meta["namespace"], pod)
        self.server.update(
            pods,
            meta["namespace"],
            created["metadata"]["name"],
            lambda o: {**o, "status": {"phase": "Pending", "conditions": []}},
            "status",
        )
        return True

    # ------------------------------------------------------------------ the kubelet

    async def _kubelet(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        pods = self.server.resource(*POD_RESOURCES)
        container = pod["spec"]["containers"][0]

        def status(change: dict[str, Any]) -> None:
            with contextlib.suppress(ApiError):
                self.server.update(
                    pods, ns, name, lambda o: {**o, "status": merge_patch(o.get("status") or {}, change)}, "status"
                )

        def deleting() -> bool:
            current = self.server.objects[pods.key].get((ns, name))
            return current is None or bool(current["metadata"].get("deletionTimestamp"))

        # Scheduling: extended resources against the capacity not held by running pods.
        while True:
            self._wake[uid].clear()
            if deleting():
                self.server.remove(pods, ns, name)
                return
            short = self._shortfall(container, uid)
            if not short:
                break
            message = f"0/1 nodes are available: 1 Insufficient {short}. preemption: 0/1 nodes are available."
            status(
                {
                    "conditions": [
                        {
                            "type": "PodScheduled",
                            "status": "False",
                            "reason": "Unschedulable",
                            "message": message,
                            "lastTransitionTime": now_iso(),
                        }
                    ]
                }
            )
            await self._wake[uid].wait()
        status({"conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso()}]})

        # The image.
        invalid = container["image"] != container["image"].lower()
        if invalid or any(bad in container["image"] for bad in self.unpullable):
            reason, message = (
                (
                    "InvalidImageName",
                    f'Failed to apply default image tag "{container["image"]}": couldn\'t parse image name',
                )
                if invalid
                else ("ImagePullBackOff", f'Back-off pulling image "{container["image"]}"')
            )
            status(
                {
                    "containerStatuses": [
                        _container_status(container, {"waiting": {"reason": reason, "message": message}})
                    ]
                }
            )
            while not deleting():
                self._wake[uid].clear()
                await self._wake[uid].wait()
            self.server.remove(pods, ns, name)
            return

        # The container's environment: a missing Secret or ConfigMap key keeps it from being created.
        while (missing := self._missing_reference(pod)) is not None:
            status(
                {
                    "containerStatuses": [
                        _container_status(
                            container, {"waiting": {"reason": "CreateContainerConfigError", "message": missing}}
                        )
                    ]
                }
            )
            self._wake[uid].clear()
            with contextlib.suppress(asyncio.TimeoutError):  # the kubelet retries on its own
                await asyncio.wait_for(self._wake[uid].wait(), 0.5)
            if deleting():
                self.server.remove(pods, ns, name)
                return

        if self.instant:
            done = {"terminated": {"exitCode": 0, "reason": "Completed", "message": "", "finishedAt": now_iso()}}
            status(
                {
                    "phase": "Succeeded",
                    "startTime": now_iso(),
                    "containerStatuses": [_container_status(container, done)],
                }
            )
            return

        # Run.
        process = await self._spawn(pod)
        self.processes[uid] = process
        status(
            {
                "phase": "Running",
                "startTime": now_iso(),
                "containerStatuses": [_container_status(container, {"running": {"startedAt": now_iso()}}, ready=True)],
            }
        )
        wait_exit = asyncio.ensure_future(process.proc.wait())
        grace = float(pod["spec"].get("terminationGracePeriodSeconds", 30))
        signalled = False
        while not wait_exit.done():
            self._wake[uid].clear()
            woke = asyncio.ensure_future(self._wake[uid].wait())
            await asyncio.wait({wait_exit, woke}, return_when=asyncio.FIRST_COMPLETED)
            woke.cancel()
            if deleting() and not signalled:
                signalled = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.proc.pid, signal.SIGTERM)
                asyncio.get_running_loop().call_later(grace, _kill, process)
        code = await wait_exit
        code = 128 - code if code < 0 else code  # a signal death reads as the shell reports it
        reason = process.kill_reason or ("Completed" if code == 0 else "Error")
        message = process.termination.read_text(errors="replace") if process.termination.exists() else ""
        if not message.strip() and code != 0 and _fallback_to_logs(container):
            message = "\n".join(process.log.read_text(errors="replace").splitlines()[-80:])[-2048:]
        status(
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [
                    _container_status(
                        container,
                        {
                            "terminated": {
                                "exitCode": code,
                                "reason": reason,
                                "message": message,
                                "finishedAt": now_iso(),
                            }
                        },
                    )
                ],
            }
        )
        if deleting():
            self.server.remove(pods, ns, name)

    def _shortfall(self, container: dict[str, Any], uid: str) -> str | None:
        wanted = {k: int(v) for k, v in (container.get("resources", {}).get("limits") or {}).items() if "/" in k}
        if not wanted:
            return None
        used: dict[str, int] = {}
        for other_uid, process in self.processes.items():
            if other_uid != uid and process.proc.returncode is None:
                other = self._pod_by_uid(other_uid)
                limits = ((other or {}).get("spec", {}).get("containers") or [{}])[0].get("resources", {}).get(
                    "limits"
                ) or {}
                for k, v in limits.items():
                    if "/" in k:
                        used[k] = used.get(k, 0) + int(v)
        for resource, amount in wanted.items():
            if amount > self.capacity.get(resource, 0) - used.get(resource, 0):
                return resource
        return None

    def _pod_by_uid(self, uid: str) -> dict[str, Any] | None:
        return next((p for p in self.server.objects[POD_RESOURCES].values() if p["metadata"]["uid"] == uid), None)

    async def _spawn(self, pod: dict[str, Any]) -> Process:
        meta, spec = pod["metadata"], pod["spec"]
        ns = meta["namespace"]
        container = spec["containers"][0]
        home = self.root / "pods" / meta["name"]
        home.mkdir(parents=True, exist_ok=True)
        mounts: dict[str, Path] = {}
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                path = self.volume(ns, volume["persistentVolumeClaim"]["claimName"])
            elif "configMap" in volume:
                path = home / "volumes" / mount["name"]
                data = self.server.get(self.server.resource("", "configmaps"), ns, volume["configMap"]["name"])
                path.mkdir(parents=True, exist_ok=True)
                for key, value in (data.get("data") or {}).items():
                    (path / key).write_text(value)
            else:
                path = home / "volumes" / mount["name"]
            path.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = path
        termination = home / "termination-log"
        mounts[container.get("terminationMessagePath", "/dev/termination-log")] = termination

        def host(value: str) -> str:
            for mount_path in sorted(mounts, key=len, reverse=True):
                if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                    return str(mounts[mount_path]) + value[len(mount_path) :]
            return value

        env = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **self.env}
        for var in container.get("env") or []:
            env[var["name"]] = host(self._env_value(var, pod))
        argv = [host(a) for a in [*(container.get("command") or []), *(container.get("args") or [])]]
        log = home / "log.txt"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=host(container.get("workingDir", "/")),
                env=env,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group: signals reach the trainer's children too
            )
        return Process(f"{ns}/{meta['name']}", proc, log, termination)

    def _missing_reference(self, pod: dict[str, Any]) -> str | None:
        """The kubelet's message for the first env reference that does not resolve, or None."""
        ns = pod["metadata"]["namespace"]
        for var in pod["spec"]["containers"][0].get("env") or []:
            source = var.get("valueFrom") or {}
            for kind, plural, title in (
                ("secretKeyRef", "secrets", "Secret"),
                ("configMapKeyRef", "configmaps", "ConfigMap"),
            ):
                if kind not in source or source[kind].get("optional"):
                    continue
                ref = source[kind]
                found = self.server.objects[("", plural)].get((ns, ref["name"]))
                if found is None:
                    return f'{title.lower()} "{ref["name"]}" not found'
                if ref["key"] not in {**(found.get("data") or {}), **(found.get("stringData") or {})}:
                    return f"couldn't find key {ref['key']} in {title} {ns}/{ref['name']}"
        return None

    def _env_value(self, var: dict[str, Any], pod: dict[str, Any]) -> str:
        if "value" in var:
            return var["value"]
        source = var.get("valueFrom") or {}
        ns = pod["metadata"]["namespace"]
        if "fieldRef" in source:
            obj: Any = pod
            for part in source["fieldRef"]["fieldPath"].split("."):
                obj = obj.get(part, "")
            return str(obj)
        for kind, plural in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
            if kind in source:
                ref = source[kind]
                found = self.server.get(self.server.resource("", plural), ns, ref["name"])
                value = (found.get("stringData") or found.get("data") or {}).get(ref["key"], "")
                if plural == "secrets" and "data" in found and ref["key"] in found["data"]:
                    import base64

                    value = base64.b64decode(value).decode()
                return value
        return ""


def _container_status(container: dict[str, Any], state: dict[str, Any], ready: bool = False) -> dict[str, Any]:
    """A container status as the kubelet writes it (the kubernetes client requires image and imageID)."""
    pulled = "waiting" not in state
    return {
        "name": container["name"],
        "image": container["image"],
        "imageID": f"docker.io/{container['image']}@sha256:{'0' * 64}" if pulled else "",
        "ready": ready,
        "started": "running" in state,
        "restartCount": 0,
        "state": state,
    }


def _kill(process: Process) -> None:
    if process.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.proc.pid, signal.SIGKILL)


def _fallback_to_logs(container: dict[str, Any]) -> bool:
    return container.get("terminationMessagePolicy") == "FallbackToLogsOnError"


def _exit_code(pod: dict[str, Any]) -> int | None:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated:
            return terminated.get("exitCode")
    return None


def _policy_action(policy: dict[str, Any] | None, pod: dict[str, Any]) -> tuple[str, int | None]:
    """The podFailurePolicy rule a failed pod matches: (action, index); Count when none does."""
    code = _exit_code(pod)
    conditions = {(c["type"], c.get("status", "True")) for c in pod.get("status", {}).get("conditions") or []}
    for index, rule in enumerate((policy or {}).get("rules") or []):
        exits = rule.get("onExitCodes")
        if exits is not None and code is not None:
            inside = code in exits["values"]
            if (exits["operator"] == "In") == inside:
                return rule["action"], index
        for wanted in rule.get("onPodConditions") or []:
            if (wanted["type"], wanted.get("status", "True")) in conditions:
                return rule["action"], index
    return "Count", None


def _finished_at(status: dict[str, Any]) -> datetime | None:
    """When a Job completed or failed, or None while it has not."""
    for cond in status.get("conditions") or []:
        if cond["type"] in ("Complete", "Failed") and cond.get("status") == "True":
            return datetime.fromisoformat(cond["lastTransitionTime"].replace("Z", "+00:00"))
    return None


def _condition(status: dict[str, Any], kind: str) -> bool:
    return any(c["type"] == kind and c.get("status") == "True" for c in status.get("conditions") or [])


def _new_condition(kind: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": now_iso(),
        "lastTransitionTime": now_iso(),
    }


def _with_condition(pod: dict[str, Any], condition: dict[str, Any]) -> dict[str, Any]:
    status = dict(pod.get("status") or {})
    status["conditions"] = [c for c in status.get("conditions") or [] if c["type"] != condition["type"]] + [condition]
    return {**pod, "status": status}
