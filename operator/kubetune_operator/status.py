"""Pure status derivation: what the run's children look like in, the run's status out.

`derive` answers the questions users of other operators cannot get answered without
reading pods: is it waiting (and for what), running, restarting, suspended, done, or
failed, and if failed, why and what to change. Terminal phases are sticky. A
condition's lastTransitionTime changes only when its status does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any, NamedTuple

from kubetune_operator import api
from kubetune_operator import constants as c


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


@dataclass(frozen=True)
class PodView:
    name: str
    phase: str
    created: str | None = None
    unschedulable: str | None = None  # the scheduler's message while it cannot place the pod
    waiting_reason: str | None = None  # e.g. ErrImagePull, ImagePullBackOff, CreateContainerConfigError
    waiting_message: str | None = None
    exit_code: int | None = None
    terminated_reason: str | None = None  # Completed, Error, OOMKilled, ...
    message: str | None = None  # the termination message: the trainer's error, or the log's tail
    disrupted: bool = False  # evicted, preempted, drained: not the trainer's failure

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
            unschedulable=unschedulable,
            waiting_reason=waiting.get("reason"),
            waiting_message=waiting.get("message"),
            exit_code=terminated.get("exitCode"),
            terminated_reason=terminated.get("reason"),
            message=terminated.get("message"),
            disrupted=conditions.get("DisruptionTarget", {}).get("status") == "True",
        )


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

    @classmethod
    def from_dict(cls, job: dict[str, Any], pods: list[dict[str, Any]]) -> JobView:
        status = job.get("status") or {}
        views = sorted((PodView.from_dict(p) for p in pods), key=lambda p: (p.created or "", p.name))
        return cls(
            name=job["metadata"]["name"],
            suspended=bool((job.get("spec") or {}).get("suspend")),
            active=status.get("active", 0),
            succeeded=status.get("succeeded", 0),
            failed=status.get("failed", 0),
            conditions={cond["type"]: cond for cond in status.get("conditions") or [] if cond.get("status") == "True"},
            start_time=status.get("startTime"),
            completion_time=status.get("completionTime"),
            pods=tuple(views),
        )

    @property
    def complete(self) -> bool:
        return "Complete" in self.conditions

    @property
    def failed_condition(self) -> dict[str, Any] | None:
        return self.conditions.get("Failed")

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
    restarts: int = 0  # training pods that ended, and were replaced, while the run was not suspended


@dataclass(frozen=True)
class Derived:
    phase: str
    reason: str
    message: str
    status: dict[str, Any]  # the operator's status fields, ready for one merge patch
    stop_jobs: bool = False  # the Jobs must not go on (a failure they cannot see, e.g. an image that never pulls)

    @property
    def summary(self) -> tuple[str, str]:
        return self.phase, self.reason


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


def _last_failure(job: JobView) -> PodView | None:
    failures = [p for p in job.failed_pods if not p.disrupted]
    return failures[-1] if failures else None


def failure(job: JobView, spec: api.TrainingRunSpec, component: str) -> tuple[str, str]:
    """Why a failed Job failed, as (reason, message that says what to change)."""
    condition = job.failed_condition or {}
    where = f"the {component} pod"
    if condition.get("reason") == "DeadlineExceeded":
        return c.REASON_DEADLINE, (
            f"Training ran past spec.activeDeadlineSeconds={spec.active_deadline_seconds} and was stopped; its "
            "checkpoints are kept. Raise activeDeadlineSeconds (it can be changed on a run) or shorten the run."
        )
    pod = _last_failure(job)
    if pod is not None and pod.exit_code in c.FAILJOB_EXIT_CODES:
        reason = c.FAILJOB_EXIT_CODES[pod.exit_code]
        detail = trainer_message(pod) or f"{where} exited with code {pod.exit_code}"
        return reason, detail
    if pod is not None and pod.terminated_reason == "OOMKilled":
        setting, limit = (
            ("memory", spec.resources.memory)
            if component == c.TRAIN
            else ("prepareMemory", spec.resources.prepare_memory)
        )
        return c.REASON_OOM, (
            f"{where.capitalize()} was killed for using more memory than spec.resources.{setting}={limit} allows. "
            "Raise it, or lower training.batchSize or dataset.maxSeqLength."
        )
    attempts = len([p for p in job.failed_pods if not p.disrupted])
    last = ""
    if pod is not None:
        words = trainer_message(pod)
        last = f" The last attempt exited with code {pod.exit_code}" + (f": {words}" if words else ".")
    return c.REASON_BACKOFF, (
        f"{where.capitalize()} failed {attempts} time(s), more than spec.maxRestarts allows.{last} "
        f"See `kubectl logs job/{job.name}`; fix the cause, then raise spec.maxRestarts to retry."
    ).strip()


def _image_pull(pod: PodView, now: datetime) -> tuple[bool, str] | None:
    """(given up, message) for a pod whose image does not pull."""
    if pod.waiting_reason not in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
        return None
    created = _parse_time(pod.created)
    waited = (now - created).total_seconds() if created else 0
    given_up = pod.waiting_reason == "InvalidImageName" or waited >= c.IMAGE_PULL_GRACE_SECONDS
    detail = pod.waiting_message or pod.waiting_reason
    return given_up, (
        f"Cannot pull the trainer image ({detail}). Check spec.image (or the operator's trainer.image), that the "
        "registry is reachable from the nodes, and imagePullSecrets."
    )


def _scheduling(pod: PodView, component: str) -> str:
    advice = (
        "free GPUs or wait; or change spec.resources (gpu, gpuType), nodeSelector or tolerations"
        if component == c.TRAIN
        else "free capacity or lower spec.resources.prepareCpu/prepareMemory"
    )
    return f"Waiting for a node for the {component} pod: {(pod.unschedulable or '').rstrip('.')}. To go on: {advice}."


# --------------------------------------------------------------------------- the derivation


class Verdict(NamedTuple):
    phase: str
    reason: str
    message: str
    stop_jobs: bool = False  # the Jobs must not go on: a failure they cannot see, e.g. an image that never pulls


def _pending(pod: PodView, obs: Observation, component: str, waiting_phase: str) -> Verdict | None:
    """The verdict on a pod not yet running: an image that does not pull, or no node for it."""
    if (pulled := _image_pull(pod, obs.now)) is not None:
        given_up, message = pulled
        return (
            Verdict(c.FAILED, c.REASON_IMAGE_PULL, message, True)
            if given_up
            else Verdict(waiting_phase, c.REASON_IMAGE_PULL, message)
        )
    if pod.unschedulable:
        return Verdict(waiting_phase, c.REASON_UNSCHEDULABLE, _scheduling(pod, component))
    return None


def _phase(obs: Observation) -> Verdict:
    if obs.invalid is not None:
        return Verdict(c.FAILED, c.REASON_INVALID_SPEC, obs.invalid)
    spec = obs.spec
    assert spec is not None
    prev = obs.previous
    if prev.get("phase") in c.TERMINAL and prev.get("observedGeneration") == obs.generation:
        return Verdict(
            prev["phase"], prev.get("reason", ""), prev.get("message", ""), prev.get("reason") == c.REASON_IMAGE_PULL
        )

    prepare = obs.prepare
    if prepare is None:
        return Verdict(c.PENDING, "Creating", "Creating the run's volume, config and prepare Job.")
    if prepare.failed_condition is not None:
        return Verdict(c.FAILED, *failure(prepare, spec, c.PREPARE))
    if not prepare.complete:
        for pod in prepare.pending_pods:
            if (verdict := _pending(pod, obs, c.PREPARE, c.INITIALIZING)) is not None:
                return verdict
        return Verdict(c.INITIALIZING, "Preparing", "Fetching the model and checking and tokenizing the data.")

    train = obs.train
    if train is None:
        if spec.suspend:
            return Verdict(c.SUSPENDED, "Suspended", "Suspended before training started; set spec.suspend: false.")
        return Verdict(c.INITIALIZING, "Prepared", "Data and model are ready; creating the training Job.")
    if train.failed_condition is not None:
        return Verdict(c.FAILED, *failure(train, spec, c.TRAIN))
    if train.complete:
        return Verdict(
            c.SUCCEEDED,
            "Completed",
            f"Training finished; the adapter is on volume {obs.volume} in {output_path(spec)}.",
        )
    if spec.suspend:
        if train.running_pods:
            return Verdict(c.SUSPENDED, "Suspending", "The trainer is saving a checkpoint before it stops.")
        return Verdict(c.SUSPENDED, "Suspended", "Suspended with its checkpoint saved; set spec.suspend: false.")
    if train.suspended and spec.queue_name:
        return Verdict(
            c.QUEUED, c.REASON_KUEUE, f"Waiting for Kueue to admit the training Job in queue {spec.queue_name}."
        )
    for pod in train.pending_pods:
        if (verdict := _pending(pod, obs, c.TRAIN, c.QUEUED)) is not None:
            return verdict
    if train.running_pods:
        restarts = max(obs.restarts, int(prev.get("restarts") or 0))
        return Verdict(c.RUNNING, "Training", f"Training (attempt {restarts + 1})." if restarts else "Training.")
    if train.pending_pods:
        return Verdict(c.QUEUED, "Starting", "The training pod is starting.")
    if train.failed_pods:
        last = train.failed_pods[-1]
        words = "" if last.disrupted else trainer_message(last)
        why = "was evicted" if last.disrupted else f"exited with code {last.exit_code}"
        return Verdict(
            c.RUNNING,
            "Restarting",
            f"The training pod {why}{': ' + words if words else ''}; "
            "starting another that resumes from the newest checkpoint.",
        )
    return Verdict(c.QUEUED, "Starting", "Waiting for the training pod to be created.")


@dataclass
class PodLedger:
    """The training pods of one run the operator has seen, and how each ended.

    Pods vanish fast (an evicted pod is deleted within seconds), so restarts cannot be counted
    from a single look; and a pod stopped because the run was suspended is not a restart.
    """

    alive: set[str] = field(default_factory=set)
    restarted: set[str] = field(default_factory=set)
    excused: set[str] = field(default_factory=set)

    def look(self, train: JobView | None, suspended: bool) -> int:
        """Record one observation; return the restarts so far."""
        if train is None:
            return len(self.restarted)
        current = {p.name for p in train.pods}
        ended = (self.alive - current) | {p.name for p in train.failed_pods}
        ended -= self.restarted | self.excused
        if not train.complete:
            (self.excused if suspended else self.restarted).update(ended)
        self.alive = {p.name for p in train.pods if p.phase in ("Pending", "Running")}
        return len(self.restarted)


def output_path(spec: api.TrainingRunSpec) -> str:
    out = PurePosixPath(spec.output.dir)
    return str(out if out.is_absolute() else PurePosixPath(c.WORKSPACE) / out)


CONDITION_TYPES = ("Initialized", "Running", "Suspended", "Succeeded", "Failed")


def _conditions(obs: Observation, phase: str, reason: str, message: str, now: str) -> list[dict[str, Any]]:
    initialized = obs.prepare is not None and obs.prepare.complete
    truth = {
        "Initialized": initialized or (phase == c.SUCCEEDED),
        "Running": phase == c.RUNNING,
        "Suspended": phase == c.SUSPENDED,
        "Succeeded": phase == c.SUCCEEDED,
        "Failed": phase == c.FAILED,
    }
    previous = {cond.get("type"): cond for cond in obs.previous.get("conditions") or []}
    out = []
    for kind in CONDITION_TYPES:
        status = "True" if truth[kind] else "False"
        before = previous.get(kind)
        if kind == "Initialized":
            cond_reason, cond_message = ("Prepared", "Model and data are ready.") if truth[kind] else (reason, message)
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


def derive(obs: Observation) -> Derived:
    phase, reason, message, stop_jobs = _phase(obs)
    now = _iso(obs.now)
    prev = obs.previous
    status: dict[str, Any] = {
        "phase": phase,
        "reason": reason,
        "message": message,
        "conditions": _conditions(obs, phase, reason, message, now),
        "observedGeneration": obs.generation,
        "restarts": max(int(prev.get("restarts") or 0), obs.restarts),
        "jobName": obs.train.name if obs.train is not None else prev.get("jobName"),
        "startTime": prev.get("startTime") or (now if phase == c.RUNNING else None),
        "completionTime": prev.get("completionTime") or (now if phase in c.TERMINAL else None),
    }
    if obs.spec is not None and obs.volume:
        status["output"] = {"volume": obs.volume, "path": output_path(obs.spec)}
    return Derived(phase, reason, message, {k: v for k, v in status.items() if v is not None}, stop_jobs)
