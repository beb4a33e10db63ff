"""Pure status derivation: what the run's children look like in, the run's status out.

`derive` answers the questions users of other operators cannot get answered without
reading pods: is it waiting (and for what), running, restarting, suspended, done, or
failed, and if failed, why and what to change. Succeeded and Failed are absorbing: the
one way out is a retry (`retry_due`), when the limit a run failed on was raised. A
condition's lastTransitionTime changes only when its status does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple

from kubetune_operator import api
from kubetune_operator import constants as c


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _rfc3339(value: str | None) -> str | None:
    """A time as Kubernetes writes it (2026-11-22T12:00:00Z); the client's models give +00:00."""
    moment = _parse_time(value)
    return _iso(moment) if moment is not None else None


def controller_uid(obj: dict[str, Any]) -> str | None:
    """The uid of the object's controller (its ownerReference with controller: true)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((r.get("uid") for r in refs if r.get("controller")), None)


def exceeds_quota(message: str) -> bool:
    """The API server's refusal says a ResourceQuota is full: room may come, so it is a wait, not a failure."""
    return c.QUOTA_EXCEEDED in message


@dataclass(frozen=True)
class PodView:
    name: str
    phase: str
    created: str | None = None
    scheduled: str | None = None  # when the scheduler bound it to a node (PodScheduled turned True)
    unschedulable: str | None = None  # the scheduler's message while it cannot place the pod
    waiting_reason: str | None = None  # e.g. ErrImagePull, ImagePullBackOff, CreateContainerConfigError
    waiting_message: str | None = None
    exit_code: int | None = None
    terminated_reason: str | None = None  # Completed, Error, OOMKilled, ...
    message: str | None = None  # the termination message: the trainer's error, or the log's tail
    disrupted: bool = False  # evicted, preempted, drained: not the trainer's failure
    owner_uid: str | None = None  # uid of the Job that controls it

    @classmethod
    def from_dict(cls, pod: dict[str, Any]) -> PodView:
        status = pod.get("status") or {}
        conditions = {cond.get("type"): cond for cond in status.get("conditions") or []}
        scheduled = conditions.get("PodScheduled", {})
        unschedulable = (
            scheduled.get("message") or "no node fits the pod"
            if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable"
            else None
        )
        container = next(
            (s for s in status.get("containerStatuses") or [] if s.get("name") == c.CONTAINER),
            {},
        )
        state = container.get("state") or {}
        waiting = state.get("waiting") or {}
        terminated = state.get("terminated") or {}
        return cls(
            name=pod["metadata"]["name"],
            phase=status.get("phase", "Pending"),
            created=pod["metadata"].get("creationTimestamp"),
            scheduled=scheduled.get("lastTransitionTime") if scheduled.get("status") == "True" else None,
            unschedulable=unschedulable,
            waiting_reason=waiting.get("reason"),
            waiting_message=waiting.get("message"),
            exit_code=terminated.get("exitCode"),
            terminated_reason=terminated.get("reason"),
            message=terminated.get("message"),
            disrupted=conditions.get("DisruptionTarget", {}).get("status") == "True",
            owner_uid=controller_uid(pod),
        )

    @property
    def ended(self) -> bool:
        """Its containers have stopped (a pod being deleted still runs until they do)."""
        return self.phase in ("Succeeded", "Failed")


@dataclass(frozen=True)
class JobView:
    name: str
    suspended: bool = False
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)  # type -> condition, only True ones
    start_time: str | None = None
    completion_time: str | None = None
    pods: tuple[PodView, ...] = ()
    uid: str | None = None
    created: str | None = None
    kueue: bool = False  # carries Kueue's queue-name label: Kueue decides when it runs
    # Why the Job controller cannot create its pod (its latest FailedCreate Event), looked up only once the Job
    # has had no live pod for a while (awaits_pod).
    create_failure: str | None = None
    # The spec fields a running Job may change (the API server keeps the rest of a Job's spec fixed).
    backoff_limit: int | None = None
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = None

    @classmethod
    def from_dict(cls, job: dict[str, Any], pods: Iterable[PodView] = ()) -> JobView:
        """The Job, with its pods (those it controls), oldest first."""
        status = job.get("status") or {}
        spec = job.get("spec") or {}
        views = sorted(pods, key=lambda p: (p.created or "", p.name))
        return cls(
            name=job["metadata"]["name"],
            suspended=bool(spec.get("suspend")),
            active=status.get("active", 0),
            succeeded=status.get("succeeded", 0),
            failed=status.get("failed", 0),
            conditions={cond["type"]: cond for cond in status.get("conditions") or [] if cond.get("status") == "True"},
            start_time=_rfc3339(status.get("startTime")),
            completion_time=_rfc3339(status.get("completionTime")),
            pods=tuple(views),
            uid=job["metadata"].get("uid"),
            created=_rfc3339(job["metadata"].get("creationTimestamp")),
            kueue=c.LABEL_KUEUE_QUEUE in (job["metadata"].get("labels") or {}),
            backoff_limit=spec.get("backoffLimit"),
            active_deadline_seconds=spec.get("activeDeadlineSeconds"),
            ttl_seconds_after_finished=spec.get("ttlSecondsAfterFinished"),
        )

    # Since Kubernetes 1.31 the Job controller sets FailureTarget (SuccessCriteriaMet) as soon as the outcome is
    # decided, and Failed (Complete) only once the Job's pods have terminated: the outcome counts from the first.
    @property
    def finished(self) -> bool:
        return self.complete or self.failed_condition is not None

    @property
    def complete(self) -> bool:
        return self.complete_condition is not None

    @property
    def complete_condition(self) -> dict[str, Any] | None:
        return self.conditions.get("Complete") or self.conditions.get("SuccessCriteriaMet")

    @property
    def failed_condition(self) -> dict[str, Any] | None:
        return self.conditions.get("Failed") or self.conditions.get("FailureTarget")

    @property
    def live_pods(self) -> list[PodView]:
        return [p for p in self.pods if not p.ended]

    @property
    def pending_pods(self) -> list[PodView]:
        return [p for p in self.pods if p.phase == "Pending"]

    @property
    def running_pods(self) -> list[PodView]:
        return [p for p in self.pods if p.phase == "Running"]

    @property
    def failed_pods(self) -> list[PodView]:
        return [p for p in self.pods if p.phase == "Failed"]


@dataclass(frozen=True)
class Observation:
    """Everything derive() looks at, gathered once per reconcile."""

    name: str
    generation: int
    spec: api.TrainingRunSpec | None
    invalid: str | None  # why the spec does not validate, if it does not
    prepare: JobView | None
    train: JobView | None
    previous: dict[str, Any]
    now: datetime
    volume: str | None = None
    output: str | None = None  # the adapter's directory in the volume (resources.output_path)
    pods: tuple[PodView, ...] = ()  # every pod with the run's label, also those of Jobs gone or replaced
    restarts: int = 0  # training pods that ended, and were replaced, while the run was not suspended
    create_error: str | None = None  # the API server refused to create a child (a 4xx): the run cannot go on
    blocked: tuple[str, str] | None = None  # (reason, message): a child cannot be created yet (transient)
    earlier_volume: bool = False  # the run's volume existed already, made by an earlier run of its name


@dataclass(frozen=True)
class Derived:
    phase: str
    reason: str
    message: str
    status: dict[str, Any]  # the operator's status fields, ready for one merge patch
    stop_jobs: bool = False  # the Jobs must not go on (a failure they cannot see, e.g. an image that never pulls)
    retry: bool = False  # replace the failed training Job: the limit it failed on was raised

    @property
    def summary(self) -> tuple[str, str]:
        return self.phase, self.reason


def prepared(obs: Observation) -> bool:
    """The prepare Job succeeded, now or earlier: once it has, the run never prepares again, even when
    the Job is gone (ttlSecondsAfterFinished, a user's delete)."""
    if obs.prepare is not None and obs.prepare.complete:
        return True
    before = {cond.get("type"): cond.get("status") for cond in obs.previous.get("conditions") or []}
    return before.get(c.CONDITION_INITIALIZED) == "True" or bool(obs.previous.get("jobName"))


def old_pods(obs: Observation) -> list[PodView]:
    """The run's pods still running for no Job of the run now: a deleted training Job's (a Kueue suspension,
    a retry, an invalid spec) whose trainer is still saving its checkpoint, or a deleted run's of the same name.
    Deleting a Job frees its name at once, but a new training Job must not start a second trainer on the same
    volume while one of these runs."""
    current = {job.uid for job in (obs.prepare, obs.train) if job is not None and job.uid}
    return [p for p in obs.pods if not p.ended and p.owner_uid not in current]


def started(obs: Observation) -> bool:
    """Anything of the run exists or existed: its Jobs, or a status that says it was prepared."""
    return obs.prepare is not None or obs.train is not None or prepared(obs)


def _pod_due_since(job: JobView) -> datetime | None:
    """Since when the Job's next pod is due: its creation, its last start (a resumed Job's startTime moves) or
    its newest pod's creation, whichever is latest. Older FailedCreate Events were about an attempt that has
    since got its pod."""
    times = (_parse_time(t) for t in (job.created, job.start_time, *(p.created for p in job.pods)))
    return max((t for t in times if t is not None), default=None)


def awaits_pod(job: JobView, now: datetime, grace: float) -> bool:
    """The Job should have a live pod by now and has none: `grace` seconds after it was due (_pod_due_since),
    it is not suspended, not finished. Then the Job controller may be failing to create the pod, and only its
    Events say why (a full ResourceQuota, a missing PriorityClass, an admission webhook or PodSecurity denial).
    A pod between restarts (the Job's backoff) also has none for a while."""
    if job.suspended or job.finished or job.live_pods:
        return False
    since = _pod_due_since(job)
    return since is not None and (now - since).total_seconds() >= grace


def _event_time(event: dict[str, Any]) -> datetime | None:
    meta = event.get("metadata") or {}
    when = event.get("lastTimestamp") or event.get("eventTime") or meta.get("creationTimestamp")
    return _parse_time(when) if isinstance(when, str) else None


def pod_create_failure(events: list[dict[str, Any]], job: JobView) -> str | None:
    """The message of the Job's latest FailedCreate Event since its next pod was due (_pod_due_since), or None."""
    floor = _pod_due_since(job)
    dated = [(when, e) for e in events if (when := _event_time(e)) is not None and (floor is None or when >= floor)]
    if not dated:
        return None
    _, latest = max(dated, key=lambda pair: (pair[0], int(pair[1].get("count") or 0)))
    return str(latest.get("message") or "").strip() or None


# --------------------------------------------------------------------------- messages


def trainer_message(pod: PodView) -> str:
    """The trainer's own words from its termination message (JSON), or the log tail Kubernetes kept."""
    if not pod.message:
        return ""
    try:
        parsed = json.loads(pod.message)
        return str(parsed.get("message", pod.message)) if isinstance(parsed, dict) else pod.message.strip()
    except ValueError:
        lines = [line for line in pod.message.strip().splitlines() if line.strip()]
        return " | ".join(lines[-3:])


def trainer_reason(pod: PodView) -> str | None:
    """The machine-readable reason in the trainer's termination message (JSON {"reason", "message"}), or None."""
    try:
        parsed = json.loads(pod.message or "")
    except ValueError:
        return None
    reason = parsed.get("reason") if isinstance(parsed, dict) else None
    return reason if isinstance(reason, str) else None


def _last_failure(job: JobView) -> PodView | None:
    failures = [p for p in job.failed_pods if not p.disrupted]
    return failures[-1] if failures else None


def _while_kept(spec: api.TrainingRunSpec) -> str:
    """The retry needs the failed Job (it holds the limits it failed on): say how long it is kept."""
    ttl = spec.ttl_seconds_after_finished
    return "" if ttl is None else f" within ttlSecondsAfterFinished={ttl}s, while the failed Job is kept"


def _after_trainer(reason: str, obs: Observation) -> str:
    """What to do in a cluster after the trainer's own words (written for a local run, where the config can
    change and the run can simply be started again): a TrainingRun's spec is fixed, and a failed run stays
    failed. Its volume is kept (unless storage.deleteWithRun), and a run applied again under the same name
    goes on from the files on it."""
    spec = obs.spec
    assert spec is not None
    claim = spec.storage.existing_claim
    own = f"{c.RUNS_DIR}/{obs.name}/"  # the run's folder on a shared claim (resources.run_config)
    folder = f"{own} on claim {obs.volume}" if claim else f"volume {obs.volume}"
    if reason == c.REASON_VOLUME_HOLDS_OTHER_RUN:
        where = (
            f"This run's folder {folder} holds the files of an earlier TrainingRun named {obs.name}, and the spec "
            "(checkpoints.dir, output.dir) is fixed. Apply this spec under another name, or delete this run, "
            f"remove {own} from the claim and apply it again"
            if claim
            else f"Volume {obs.volume} was kept from an earlier TrainingRun named {obs.name}, and the spec "
            "(checkpoints.dir, output.dir) is fixed. Apply this spec under another name, or delete this run and "
            f"PersistentVolumeClaim {obs.volume} (kubectl delete trainingrun {obs.name}; kubectl delete pvc "
            f"{obs.volume}) and apply it again"
        )
        return f"{where}; to go on with the earlier run instead, delete this run and apply that run's spec."
    if reason == c.REASON_VOLUME_FULL:
        if spec.storage.delete_with_run:
            return (
                "This run stays failed, and its volume goes when it is deleted (storage.deleteWithRun): apply it "
                "again with a larger storage.size or a lower checkpoints.keep; it starts afresh."
            )
        grow = (
            "free space on it or have it enlarged"
            if claim
            else "enlarge it (if its storage class allows) or free space on it"
        )
        return (
            f"This run stays failed; its files are kept in {folder}. To go on: {grow}, then delete this run and "
            "apply it again under the same name: it goes on from the files there (the fetched model, the newest "
            "checkpoint)."
        )
    return c.MESSAGE_FIXED_SPEC


def failure(job: JobView, obs: Observation, component: str) -> tuple[str, str]:
    """Why a failed Job failed, as (reason, message that says what to change)."""
    spec = obs.spec
    assert spec is not None
    condition = job.failed_condition or {}
    where = f"the {component} pod"
    if condition.get("reason") == "DeadlineExceeded":
        return c.REASON_DEADLINE, (
            f"Training ran past spec.activeDeadlineSeconds={job.active_deadline_seconds} and was stopped; its "
            "checkpoints are kept. To go on, raise or remove spec.activeDeadlineSeconds"
            f"{_while_kept(spec)}: the run retries from its newest checkpoint."
        )
    pod = _last_failure(job)
    if pod is not None and pod.exit_code in c.FAILJOB_EXIT_CODES:
        reason = c.FAILJOB_EXIT_CODES[pod.exit_code]
        if reason == c.REASON_INVALID_SPEC and trainer_reason(pod) == c.REASON_VOLUME_HOLDS_OTHER_RUN:
            reason = c.REASON_VOLUME_HOLDS_OTHER_RUN  # a ConfigError too (exit 2), that names what to do here
        detail = trainer_message(pod) or f"{where.capitalize()} exited with code {pod.exit_code}."
        return reason, f"{detail.rstrip()} {_after_trainer(reason, obs)}"
    if pod is not None and pod.terminated_reason == "OOMKilled":
        setting, limit = (
            ("memory", spec.resources.memory)
            if component == c.TRAIN
            else ("prepareMemory", spec.resources.prepare_memory)
        )
        return c.REASON_OOM, (
            f"{where.capitalize()} was killed for using more memory than spec.resources.{setting}={limit} allows. "
            f"Raise it, or lower training.batchSize or dataset.maxSeqLength, in {c.NEW_RUN}: resources and "
            "training are fixed once a run exists."
        )
    attempts = len([p for p in job.failed_pods if not p.disrupted])
    last = ""
    if pod is not None:
        words = trainer_message(pod)
        last = f" The last attempt exited with code {pod.exit_code}" + (f": {words}" if words else ".")
    if component == c.PREPARE:
        advice = f"See `kubectl logs job/{job.name}` and fix the cause in {c.NEW_RUN}."
    else:
        advice = (
            f"See `kubectl logs job/{job.name}`; fix the cause, then raise spec.maxRestarts{_while_kept(spec)}: "
            "the run retries from its newest checkpoint."
        )
    limit = job.backoff_limit if job.backoff_limit is not None else spec.max_restarts
    return c.REASON_BACKOFF, (
        f"{where.capitalize()} failed {attempts} time(s), more than its limit of {limit} restart(s) allows.{last} "
        f"{advice}"
    ).strip()


def retry_due(obs: Observation) -> str | None:
    """Why a failed run goes again, or None: it failed on a limit (backoffLimit, activeDeadlineSeconds) that
    the spec has since raised. The failed Job holds the limit it failed on.

    The Retrying status is written before the failed Job is deleted (were the Job gone and that write lost, the
    run would stay Failed with nothing left to retry from). So a status that says Retrying beside a failed Job
    means its deletion is still to do; the failure is read from the Job then. A replacement Job that fails has
    the spec's limits, so it is no retry."""
    spec, train, prev = obs.spec, obs.train, obs.previous
    if spec is None or train is None or train.failed_condition is None:
        return None
    if prev.get("phase") == c.FAILED:
        failed_on = prev.get("reason")
    elif prev.get("reason") == c.REASON_RETRYING:
        failed_on = failure(train, obs, c.TRAIN)[0]
    else:
        return None
    why = train.failed_condition.get("reason")
    raised = spec.max_restarts > (train.backoff_limit or 0)
    if failed_on == c.REASON_BACKOFF and why == "BackoffLimitExceeded" and raised:
        return (
            f"spec.maxRestarts was raised from {train.backoff_limit} to {spec.max_restarts}: replacing the "
            "training Job; it resumes from the newest checkpoint."
        )
    if failed_on == c.REASON_DEADLINE and why == "DeadlineExceeded":
        new = spec.active_deadline_seconds
        if new is None or new > (train.active_deadline_seconds or 0):
            change = "removed" if new is None else f"raised from {train.active_deadline_seconds}s to {new}s"
            return (
                f"spec.activeDeadlineSeconds was {change}: replacing the training Job; it resumes from the newest "
                "checkpoint."
            )
    return None


def _image_pull(pod: PodView, now: datetime) -> tuple[bool, str] | None:
    """(given up, message) for a pod whose image does not pull."""
    if pod.waiting_reason not in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
        return None
    # Counted from the pod's binding to a node, where the pull starts: a GPU pod can wait long for a node.
    since = _parse_time(pod.scheduled or pod.created)
    waited = (now - since).total_seconds() if since else 0
    given_up = pod.waiting_reason == "InvalidImageName" or waited >= c.IMAGE_PULL_GRACE_SECONDS
    detail = pod.waiting_message or pod.waiting_reason
    return given_up, (
        f"Cannot pull the trainer image ({detail}). Check spec.image (or the operator's trainer.image), that the "
        "registry is reachable from the nodes, and imagePullSecrets. spec.image is fixed once a run exists: "
        f"another image needs {c.NEW_RUN}."
    )


def _scheduling(pod: PodView, component: str) -> str:
    advice = (
        f"free GPUs or wait; or ask for other spec.resources (gpu, gpuType), nodeSelector or tolerations in {c.NEW_RUN}"
        if component == c.TRAIN
        else f"free capacity; or ask for less spec.resources.prepareCpu/prepareMemory in {c.NEW_RUN}"
    )
    return f"Waiting for a node for the {component} pod: {(pod.unschedulable or '').rstrip('.')}. To go on: {advice}."


def _create_failed(job: JobView, component: str, waiting_phase: str) -> Verdict:
    """The Job controller cannot create the pod: its FailedCreate Event says why."""
    said = (job.create_failure or "").rstrip(".")
    head = f"The Job controller cannot create the {component} pod: {said}."
    if exceeds_quota(said):
        return Verdict(
            waiting_phase,
            c.REASON_QUOTA,
            f"{head} Free room in that ResourceQuota (other pods of the namespace hold it) or have it raised; the "
            f"pod is created once it fits. Asking for less (spec.resources) needs {c.NEW_RUN}.",
        )
    return Verdict(
        waiting_phase,
        c.REASON_POD_CREATE_FAILED,
        f"{head} Remove the cause it names (e.g. create the PriorityClass, or have the namespace's PodSecurity "
        "level or admission webhook allow the pod); the pod is created once it can be. A change to the spec "
        f"(priorityClassName, resources, ...) needs {c.NEW_RUN}.",
    )


# --------------------------------------------------------------------------- the derivation


class Verdict(NamedTuple):
    phase: str
    reason: str
    message: str
    stop_jobs: bool = False  # the Jobs must not go on: a failure they cannot see, e.g. an image that never pulls
    retry: bool = False  # replace the failed training Job (see retry_due)


def _references(spec: api.TrainingRunSpec | None) -> list[tuple[str, str, str, str]]:
    """(field, kind, name, key) of every Secret and ConfigMap key the trainer's environment reads."""
    if spec is None:
        return []
    out = []
    if spec.hf_token_secret is not None:
        out.append(("spec.hfTokenSecret", "Secret", spec.hf_token_secret.name, spec.hf_token_secret.key))
    for i, var in enumerate(spec.env):
        source = var.value_from
        if source is None:
            continue
        ref, kind = (
            (source.secret_key_ref, "Secret") if source.secret_key_ref else (source.config_map_key_ref, "ConfigMap")
        )
        assert ref is not None
        out.append((f"spec.env[{i}] ({var.name})", kind, ref.name, ref.key))
    return out


def _container_config(pod: PodView, obs: Observation, component: str) -> str:
    """A container the kubelet cannot create: most often a Secret or ConfigMap key it needs is missing."""
    said = pod.waiting_message or pod.waiting_reason or ""
    refs = _references(obs.spec)
    named = [r for r in refs if f'"{r[2]}"' in said or f"/{r[2]}" in said] or refs
    if not named:
        return f"The {component} pod cannot start: {said}."
    wanted = "; ".join(f"{field}: {kind} {name}, key {key}" for field, kind, name, key in named)
    return (
        f"The {component} pod cannot start: {said}. Create what it names in the run's namespace ({wanted}); the "
        f"pod starts once it exists. The reference itself is fixed once a run exists: another one needs {c.NEW_RUN}."
    )


def _pending(pod: PodView, obs: Observation, component: str, waiting_phase: str) -> Verdict | None:
    """The verdict on a pod not yet running: an image that does not pull, a missing Secret, or no node."""
    if (pulled := _image_pull(pod, obs.now)) is not None:
        given_up, message = pulled
        return (
            Verdict(c.FAILED, c.REASON_IMAGE_PULL, message, True)
            if given_up
            else Verdict(waiting_phase, c.REASON_IMAGE_PULL, message)
        )
    if pod.waiting_reason in c.CONTAINER_CONFIG_REASONS:
        return Verdict(waiting_phase, c.REASON_CONTAINER_CONFIG, _container_config(pod, obs, component))
    if pod.unschedulable:
        return Verdict(waiting_phase, c.REASON_UNSCHEDULABLE, _scheduling(pod, component))
    return None


def _phase(obs: Observation) -> Verdict:
    prev = obs.previous
    if (prev.get("phase") in c.TERMINAL or prev.get("reason") == c.REASON_RETRYING) and (
        why := retry_due(obs)
    ) is not None:
        return Verdict(c.QUEUED, c.REASON_RETRYING, why, retry=True)
    if prev.get("phase") in c.TERMINAL:
        # Absorbing: a spec change (generation) or Jobs gone by their TTL change nothing.
        return Verdict(
            prev["phase"], prev.get("reason", ""), prev.get("message", ""), prev.get("reason") == c.REASON_IMAGE_PULL
        )
    if obs.create_error is not None:
        return Verdict(c.FAILED, c.REASON_CREATE_FAILED, obs.create_error)
    if obs.invalid is not None:
        if started(obs):
            return Verdict(
                c.SUSPENDED,
                c.REASON_INVALID_SPEC,
                c.MESSAGE_INVALID_WHILE_RUNNING.format(problem=obs.invalid),
                stop_jobs=True,
            )
        return Verdict(c.FAILED, c.REASON_INVALID_SPEC, c.MESSAGE_INVALID.format(problem=obs.invalid))
    spec = obs.spec
    assert spec is not None
    if obs.blocked is not None:
        return Verdict(c.QUEUED if prepared(obs) else c.PENDING, *obs.blocked)

    prepare = obs.prepare
    if not prepared(obs):
        if prepare is None:
            if spec.suspend:  # nothing is made while it is suspended
                return Verdict(c.SUSPENDED, c.REASON_SUSPENDED, c.MESSAGE_SUSPENDED_BEFORE_START)
            return Verdict(c.PENDING, c.REASON_CREATING, c.MESSAGE_CREATING)
        if prepare.failed_condition is not None:
            return Verdict(c.FAILED, *failure(prepare, obs, c.PREPARE))
        if spec.suspend:  # the prepare Job is suspended: its pod is stopped
            if prepare.live_pods:
                return Verdict(c.SUSPENDED, c.REASON_SUSPENDING, c.MESSAGE_SUSPENDING_PREPARE)
            return Verdict(c.SUSPENDED, c.REASON_SUSPENDED, c.MESSAGE_SUSPENDED_PREPARING)
        for pod in prepare.pending_pods:
            if (verdict := _pending(pod, obs, c.PREPARE, c.INITIALIZING)) is not None:
                return verdict
        if prepare.create_failure:
            return _create_failed(prepare, c.PREPARE, c.INITIALIZING)
        if obs.earlier_volume or prev.get("reason") == c.REASON_VOLUME_OF_EARLIER_RUN:
            # Said while it prepares (the Event stays): what a different spec will meet at the training.
            message = c.MESSAGE_VOLUME_OF_EARLIER_RUN.format(volume=obs.volume, run=obs.name)
            return Verdict(c.INITIALIZING, c.REASON_VOLUME_OF_EARLIER_RUN, message)
        return Verdict(c.INITIALIZING, c.REASON_PREPARING, c.MESSAGE_PREPARING)

    train = obs.train
    trained_before = bool(prev.get("jobName"))
    if train is None:
        lingering = old_pods(obs)
        if spec.suspend:
            if lingering:  # a Kueue run's suspension deleted its Job; the trainer is saving its checkpoint
                return Verdict(c.SUSPENDED, c.REASON_SUSPENDING, c.MESSAGE_SUSPENDING)
            if trained_before:
                return Verdict(c.SUSPENDED, c.REASON_SUSPENDED, c.MESSAGE_SUSPENDED)
            return Verdict(c.SUSPENDED, c.REASON_SUSPENDED, c.MESSAGE_SUSPENDED_BEFORE_TRAINING)
        if lingering:
            names = ", ".join(p.name for p in lingering)
            return Verdict(c.QUEUED, c.REASON_OLD_PODS, c.MESSAGE_OLD_PODS.format(pods=names))
        if prev.get("reason") == c.REASON_RETRYING:
            return Verdict(c.QUEUED, c.REASON_RETRYING, prev.get("message", ""))
        if trained_before:
            return Verdict(c.QUEUED, c.REASON_STARTING, c.MESSAGE_RESTARTING_JOB)
        return Verdict(c.INITIALIZING, c.REASON_PREPARED, c.MESSAGE_PREPARED)
    if train.failed_condition is not None:
        return Verdict(c.FAILED, *failure(train, obs, c.TRAIN))
    if train.complete:
        return Verdict(c.SUCCEEDED, c.REASON_COMPLETED, c.MESSAGE_COMPLETED.format(volume=obs.volume, path=obs.output))
    if spec.suspend:
        if train.running_pods:
            return Verdict(c.SUSPENDED, c.REASON_SUSPENDING, c.MESSAGE_SUSPENDING)
        return Verdict(c.SUSPENDED, c.REASON_SUSPENDED, c.MESSAGE_SUSPENDED)
    if train.suspended and spec.queue_name:  # fixed, so the Job carries Kueue's label (train.kueue) too
        return Verdict(c.QUEUED, c.REASON_KUEUE, c.MESSAGE_KUEUE.format(queue=spec.queue_name))
    for pod in train.pending_pods:
        if (verdict := _pending(pod, obs, c.TRAIN, c.QUEUED)) is not None:
            return verdict
    if train.running_pods:
        restarts = max(obs.restarts, int(prev.get("restarts") or 0))
        message = c.MESSAGE_TRAINING_AGAIN.format(attempt=restarts + 1) if restarts else c.MESSAGE_TRAINING
        return Verdict(c.RUNNING, c.REASON_TRAINING, message)
    if train.pending_pods:
        return Verdict(c.QUEUED, c.REASON_STARTING, c.MESSAGE_POD_STARTING)
    if train.create_failure:
        return _create_failed(train, c.TRAIN, c.QUEUED)
    if train.failed_pods:
        last = train.failed_pods[-1]
        words = "" if last.disrupted else trainer_message(last)
        why = "was evicted" if last.disrupted else f"exited with code {last.exit_code}"
        return Verdict(
            c.RUNNING, c.REASON_RESTARTING, c.MESSAGE_RESTARTING.format(why=why + (f": {words}" if words else ""))
        )
    return Verdict(c.QUEUED, c.REASON_STARTING, c.MESSAGE_POD_CREATING)


@dataclass
class PodLedger:
    """The training pods of one run the operator has seen, and how each ended.

    Pods vanish fast (an evicted pod is deleted within seconds), so restarts cannot be counted
    from a single look. A restart is a pod that ended and was replaced: the Job runs one pod at
    a time, so a new live pod replaced those that ended before it. A pod stopped because the
    run was suspended is not a restart, and neither is a final failure that no pod replaces.
    """

    alive: set[str] = field(default_factory=set)
    unreplaced: set[str] = field(default_factory=set)  # ended; no pod has replaced it yet
    restarted: set[str] = field(default_factory=set)
    excused: set[str] = field(default_factory=set)

    def look(self, train: JobView | None, suspended: bool) -> int:
        """Record one observation; return the restarts so far."""
        if train is None:  # the Job is gone (deleted for a Kueue suspension, or to retry): its pods ended
            (self.excused if suspended else self.unreplaced).update(self.alive - self.restarted - self.excused)
            self.alive = set()
            return len(self.restarted)
        current = {p.name for p in train.pods}
        ended = (self.alive - current) | {p.name for p in train.failed_pods}
        ended -= self.restarted | self.excused | self.unreplaced
        if not train.complete:
            (self.excused if suspended else self.unreplaced).update(ended)
        alive = {p.name for p in train.pods if p.phase in ("Pending", "Running")}
        if alive - self.alive:  # a new pod: it replaces those that ended
            self.restarted |= self.unreplaced
            self.unreplaced = set()
        elif train.failed_condition is not None and train.pods:  # the Job gave up after its newest pod
            final = {train.pods[-1].name}
            self.restarted |= self.unreplaced - final
            self.unreplaced &= final
        self.alive = alive
        return len(self.restarted)


def _conditions(obs: Observation, phase: str, reason: str, message: str, now: str) -> list[dict[str, Any]]:
    previous = {cond.get("type"): cond for cond in obs.previous.get("conditions") or []}
    # A Kueue run has Admitted: one with a queueName (fixed), or, its spec invalid now, one that had it.
    queued = bool(obs.spec.queue_name) if obs.spec is not None else c.CONDITION_ADMITTED in previous
    if phase in c.TERMINAL and c.CONDITION_ADMITTED in previous:
        admitted = previous[c.CONDITION_ADMITTED].get("status") == "True"  # the Job may be gone (TTL); what was, stays
    else:
        admitted = obs.train is not None and not obs.train.suspended
    truth = {
        c.CONDITION_INITIALIZED: prepared(obs),
        c.CONDITION_ADMITTED: admitted,
        c.CONDITION_RUNNING: phase == c.RUNNING,
        c.CONDITION_SUSPENDED: phase == c.SUSPENDED,
        c.CONDITION_SUCCEEDED: phase == c.SUCCEEDED,
        c.CONDITION_FAILED: phase == c.FAILED,
    }
    out = []
    for kind in c.CONDITION_TYPES:
        if kind == c.CONDITION_ADMITTED and not queued:
            continue
        status = "True" if truth[kind] else "False"
        before = previous.get(kind)
        if kind == c.CONDITION_INITIALIZED:
            cond_reason, cond_message = (c.REASON_PREPARED, c.MESSAGE_INITIALIZED) if truth[kind] else (reason, message)
        elif kind == c.CONDITION_ADMITTED:
            cond_reason, cond_message = (
                (c.REASON_ADMITTED, c.MESSAGE_ADMITTED) if truth[kind] else (c.REASON_KUEUE, c.MESSAGE_NOT_ADMITTED)
            )
        else:
            cond_reason, cond_message = (reason, message) if truth[kind] else ("", "")
        changed = before is None or before.get("status") != status
        out.append(
            {
                "type": kind,
                "status": status,
                "reason": cond_reason or ("Not" + kind),
                "message": cond_message,
                "lastTransitionTime": now if changed else before.get("lastTransitionTime", now),
                "observedGeneration": obs.generation,
            }
        )
    return out


def _completion_time(obs: Observation, phase: str, now: str) -> str | None:
    """When the run ended: the Job's own time (a run observed late still gets the right one)."""
    if phase not in c.TERMINAL:
        return None  # a retry takes the run out of its terminal phase: it has not ended
    if obs.previous.get("phase") in c.TERMINAL and obs.previous.get("completionTime"):
        return obs.previous["completionTime"]
    for job in (obs.train, obs.prepare):
        if job is None:
            continue
        if phase == c.SUCCEEDED and job.complete:
            return job.completion_time or _rfc3339((job.complete_condition or {}).get("lastTransitionTime")) or now
        if phase == c.FAILED and job.failed_condition is not None:
            return _rfc3339(job.failed_condition.get("lastTransitionTime")) or now
    return now


def derive(obs: Observation) -> Derived:
    phase, reason, message, stop_jobs, retry = _phase(obs)
    now = _iso(obs.now)
    prev = obs.previous
    train_started = obs.train.start_time if obs.train is not None else None
    status: dict[str, Any] = {
        "phase": phase,
        "reason": reason,
        "message": message,
        "conditions": _conditions(obs, phase, reason, message, now),
        "observedGeneration": obs.generation,
        "restarts": max(int(prev.get("restarts") or 0), obs.restarts),
        "jobName": obs.train.name if obs.train is not None else prev.get("jobName"),
        # The first training Job's start; Kubernetes moves a Job's startTime when it resumes.
        "startTime": prev.get("startTime") or train_started or (now if phase == c.RUNNING else None),
        "completionTime": _completion_time(obs, phase, now),
        "output": (
            {"volume": obs.volume, "path": obs.output}
            if obs.spec is not None and obs.volume and obs.output
            else prev.get("output")
        ),
    }
    return Derived(phase, reason, message, {k: v for k, v in status.items() if v is not None}, stop_jobs, retry)
