"""Status derivation, as tables: observed children in, phase/reason/message out."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from kubetune_operator import api
from kubetune_operator import constants as c
from kubetune_operator.status import (
    JobView,
    Observation,
    PodLedger,
    PodView,
    awaits_pod,
    derive,
    pod_create_failure,
)
from tests.operator.jobrunner import quota_refusal

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
SPEC = {"model": {"nameOrPath": "m"}, "dataset": {"path": "d.jsonl"}}


def make_spec(**overrides: Any) -> api.TrainingRunSpec:
    return api.TrainingRunSpec.model_validate({**SPEC, **overrides})


def ago(seconds: float) -> str:
    return (NOW - timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def pod(
    phase: str = "Running",
    *,
    exit_code: int | None = None,
    reason: str | None = None,
    message: str | None = None,
    waiting: str | None = None,
    waiting_message: str | None = None,
    unschedulable: str | None = None,
    disrupted: bool = False,
    age: float = 10,
    scheduled: float | None = None,
    owner: str | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    """A pod `age` seconds old, bound to a node `scheduled` seconds ago, controlled by the Job of uid `owner`."""
    state: dict[str, Any] = {}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "reason": reason or "Error", "message": message}}
    elif waiting:
        state = {"waiting": {"reason": waiting, "message": waiting_message or f"Back-off pulling image: {waiting}"}}
    conditions = []
    if unschedulable:
        conditions.append(
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}
        )
    if scheduled is not None:
        conditions.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": ago(scheduled)})
    if disrupted:
        conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"})
    meta: dict[str, Any] = {"name": f"p-{phase}-{exit_code}-{age}", "creationTimestamp": ago(age)}
    if owner is not None:
        meta["ownerReferences"] = [{"kind": "Job", "name": "r-train", "uid": owner, "controller": True}]
    if deleting:
        meta["deletionTimestamp"] = ago(1)
    return {
        "metadata": meta,
        "status": {
            "phase": phase,
            "conditions": conditions,
            "containerStatuses": [{"name": c.CONTAINER, "state": state}],
        },
    }


def job(
    name: str,
    *pods: dict[str, Any],
    suspended: bool = False,
    condition: str | None = None,
    condition_reason: str = "",
    labels: dict[str, str] | None = None,
    spec: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
) -> JobView:
    conditions = (
        [
            {
                "type": condition,
                "status": "True",
                "reason": condition_reason,
                "lastTransitionTime": "2026-11-22T11:30:00Z",
            }
        ]
        if condition
        else []
    )
    return JobView.from_dict(
        {
            "metadata": {"name": name, "uid": f"{name}-uid", "labels": labels or {}},
            "spec": {"suspend": suspended, **(spec or {})},
            "status": {"conditions": conditions, **(status or {})},
        },
        [PodView.from_dict(p) for p in pods],
    )


PREPARED = job("r-prepare", pod("Succeeded", exit_code=0, reason="Completed"), condition="Complete")


def observe(
    prepare: JobView | None = None,
    train: JobView | None = None,
    spec: api.TrainingRunSpec | None = None,
    previous: dict[str, Any] | None = None,
    invalid: str | None = None,
    pods: tuple[dict[str, Any], ...] = (),
) -> Observation:
    """What the operator saw; `pods` are every pod with the run's label (also those of Jobs gone)."""
    return Observation(
        name="r",
        generation=1,
        spec=spec or (None if invalid else make_spec()),
        invalid=invalid,
        prepare=prepare,
        train=train,
        previous=previous or {},
        now=NOW,
        volume="r-workspace",
        output="/workspace/output",
        pods=tuple(PodView.from_dict(p) for p in pods),
    )


def trainer_says(reason: str, message: str) -> str:
    return json.dumps({"reason": reason, "message": message})


def train_failed(
    code: int, message: str, reason: str = "PodFailurePolicy", condition: str = "Failed", said: str | None = None
) -> JobView:
    """A training Job that failed on its pod's exit code (a FailJob rule); the trainer's reason is `said`, else
    the exit code's."""
    words = trainer_says(said or c.FAILJOB_EXIT_CODES[code], message)
    return job("r-train", pod("Failed", exit_code=code, message=words), condition=condition, condition_reason=reason)


# The trainer refuses another run's files on the volume: exit 2, as any ConfigError, with its own reason.
EARLIER_CHECKPOINTS = train_failed(
    2,
    "checkpoints.dir=checkpoints holds checkpoints of a different run (model settings differ from checkpoint-40). "
    "Use another checkpoints.dir for this config, or restore those settings to resume that run.",
    said=c.REASON_VOLUME_HOLDS_OTHER_RUN,
)
EARLIER_ADAPTER = train_failed(
    2,
    "output.dir: output already holds the adapter of another run (its config.yaml differs from this one). Choose "
    "another output.dir (--set output.dir=...) or move that run away first.",
    said=c.REASON_VOLUME_HOLDS_OTHER_RUN,
)
VOLUME_FULL = train_failed(
    5,
    "checkpoints.dir=checkpoints: the volume is full while saving step 40 (No space left on device; 3 MiB free). "
    "checkpoint-30 and older checkpoints are intact. Free space, lower checkpoints.keep, or enlarge the volume, "
    "then run again to resume.",
)
QUOTA = "Error creating: " + quota_refusal('pods "r-train-x7k2p"', "requests.nvidia.com/gpu", 1, 8, 8)
NO_PRIORITY_CLASS = 'Error creating: pods "r-prepare-a1b2c" is forbidden: no PriorityClass with name high was found'


CASES = {
    "nothing yet": (observe(), c.PENDING, "Creating", "Creating the run's volume"),
    "preparing": (observe(job("r-prepare", pod("Running"))), c.INITIALIZING, "Preparing", "tokenizing the data"),
    "prepare pod unschedulable": (
        observe(job("r-prepare", pod("Pending", unschedulable="0/3 nodes are available: 3 Insufficient memory."))),
        c.INITIALIZING,
        c.REASON_UNSCHEDULABLE,
        "prepareCpu/prepareMemory",
    ),
    "prepared, no training Job yet": (observe(PREPARED), c.INITIALIZING, "Prepared", "creating the training Job"),
    "waiting for GPUs": (
        observe(
            PREPARED,
            job("r-train", pod("Pending", unschedulable="0/4 nodes are available: 4 Insufficient nvidia.com/gpu.")),
        ),
        c.QUEUED,
        c.REASON_UNSCHEDULABLE,
        "4 Insufficient nvidia.com/gpu. To go on: free GPUs or wait; or ask for other spec.resources (gpu, gpuType), "
        "nodeSelector or tolerations in a new TrainingRun (delete this one and apply it again, or apply it under "
        "another name).",
    ),
    "waiting for Kueue": (
        observe(PREPARED, job("r-train", suspended=True), spec=make_spec(queueName="gpu-queue")),
        c.QUEUED,
        c.REASON_KUEUE,
        "queue gpu-queue",
    ),
    "image pulling, within grace": (
        observe(PREPARED, job("r-train", pod("Pending", waiting="ImagePullBackOff", age=30))),
        c.QUEUED,
        c.REASON_IMAGE_PULL,
        "Check spec.image",
    ),
    "image never pulls": (
        observe(PREPARED, job("r-train", pod("Pending", waiting="ImagePullBackOff", age=600))),
        c.FAILED,
        c.REASON_IMAGE_PULL,
        "spec.image is fixed once a run exists: another image needs a new TrainingRun",
    ),
    # The grace counts from the pod's binding to a node: a GPU pod that waited long for one is not failed
    # on its first, maybe transient, pull error.
    "image pulling, after a long wait for a node": (
        observe(PREPARED, job("r-train", pod("Pending", waiting="ErrImagePull", age=900, scheduled=20))),
        c.QUEUED,
        c.REASON_IMAGE_PULL,
        "Check spec.image",
    ),
    "image never pulls, long after the pod was scheduled": (
        observe(PREPARED, job("r-train", pod("Pending", waiting="ImagePullBackOff", age=900, scheduled=600))),
        c.FAILED,
        c.REASON_IMAGE_PULL,
        "Cannot pull the trainer image",
    ),
    "running": (observe(PREPARED, job("r-train", pod("Running"))), c.RUNNING, "Training", "Training."),
    "running again after an eviction": (
        replace(
            observe(PREPARED, job("r-train", pod("Failed", exit_code=143, disrupted=True, age=99), pod("Running"))),
            restarts=1,
        ),
        c.RUNNING,
        "Training",
        "attempt 2",
    ),
    "between attempts": (
        observe(PREPARED, job("r-train", pod("Failed", exit_code=1, message="Traceback...\nRuntimeError: boom"))),
        c.RUNNING,
        "Restarting",
        "exited with code 1: Traceback... | RuntimeError: boom",
    ),
    "suspending": (
        observe(PREPARED, job("r-train", pod("Running"), suspended=True), spec=make_spec(suspend=True)),
        c.SUSPENDED,
        "Suspending",
        "saving a checkpoint",
    ),
    "suspended": (
        observe(PREPARED, job("r-train", suspended=True), spec=make_spec(suspend=True)),
        c.SUSPENDED,
        "Suspended",
        "set spec.suspend: false",
    ),
    "succeeded": (
        observe(PREPARED, job("r-train", pod("Succeeded", exit_code=0, reason="Completed"), condition="Complete")),
        c.SUCCEEDED,
        "Completed",
        "on volume r-workspace in /workspace/output",
    ),
    "invalid spec": (
        observe(invalid="Invalid spec: spec.lora.r: Input should be greater than or equal to 1."),
        c.FAILED,
        c.REASON_INVALID_SPEC,
        "spec.lora.r: Input should be greater than or equal to 1. Fix it in a new TrainingRun",
    ),
    "trainer: invalid config or data (exit 2)": (
        observe(
            job(
                "r-prepare",
                pod(
                    "Failed",
                    exit_code=2,
                    message=trainer_says(
                        "InvalidSpec", "dataset.path: /workspace/d.jsonl:7: field 'prompt' is missing."
                    ),
                ),
                condition="Failed",
                condition_reason="PodFailurePolicy",
            )
        ),
        c.FAILED,
        "InvalidSpec",
        "d.jsonl:7: field 'prompt' is missing",
    ),
    "preflight failed (exit 3)": (
        observe(
            PREPARED,
            job(
                "r-train",
                pod(
                    "Failed",
                    exit_code=3,
                    message=trainer_says(
                        "PreflightFailed", "Preflight failed:\n  gpu.cuda: 1 GPU(s) requested but CUDA sees none"
                    ),
                ),
                condition="Failed",
                condition_reason="PodFailurePolicy",
            ),
        ),
        c.FAILED,
        "PreflightFailed",
        "gpu.cuda: 1 GPU(s) requested",
    ),
    "diverged (exit 4)": (
        observe(
            PREPARED,
            job(
                "r-train",
                pod(
                    "Failed",
                    exit_code=4,
                    message=trainer_says("Diverged", "Training diverged ... Lower training.learningRate"),
                ),
                condition="Failed",
                condition_reason="PodFailurePolicy",
            ),
        ),
        c.FAILED,
        "Diverged",
        "Lower training.learningRate This run stays failed, and its spec is fixed: make the change in a new "
        "TrainingRun",
    ),
    # The trainer's words are for a local run ("run again to resume"); a failed TrainingRun stays failed.
    "volume full (exit 5)": (
        observe(PREPARED, VOLUME_FULL),
        c.FAILED,
        "VolumeFull",
        "then run again to resume. This run stays failed; its files are kept in volume r-workspace. To go on: "
        "enlarge it (if its storage class allows) or free space on it, then delete this run and apply it again "
        "under the same name: it goes on from the files there",
    ),
    "volume full (exit 5), the volume goes with the run": (
        observe(PREPARED, VOLUME_FULL, spec=make_spec(storage={"deleteWithRun": True})),
        c.FAILED,
        "VolumeFull",
        "its volume goes when it is deleted (storage.deleteWithRun): apply it again with a larger storage.size",
    ),
    "volume full (exit 5) on a shared claim": (
        observe(PREPARED, VOLUME_FULL, spec=make_spec(storage={"existingClaim": "team"})),
        c.FAILED,
        "VolumeFull",
        "its files are kept in runs/r/ on claim r-workspace. To go on: free space on it or have it enlarged",
    ),
    # A run applied again under a deleted run's name, with another model: its kept volume holds the old run's
    # checkpoints. The trainer says to use another checkpoints.dir, which a TrainingRun cannot change.
    "the kept volume holds an earlier run's checkpoints": (
        observe(PREPARED, EARLIER_CHECKPOINTS),
        c.FAILED,
        c.REASON_VOLUME_HOLDS_OTHER_RUN,
        "Volume r-workspace was kept from an earlier TrainingRun named r, and the spec (checkpoints.dir, output.dir) "
        "is fixed. Apply this spec under another name, or delete this run and PersistentVolumeClaim r-workspace "
        "(kubectl delete trainingrun r; kubectl delete pvc r-workspace) and apply it again",
    ),
    "the kept volume holds an earlier run's adapter": (
        observe(PREPARED, EARLIER_ADAPTER),
        c.FAILED,
        c.REASON_VOLUME_HOLDS_OTHER_RUN,
        "delete this run and PersistentVolumeClaim r-workspace",
    ),
    "a shared claim holds an earlier run's checkpoints in the run's folder": (
        observe(PREPARED, EARLIER_CHECKPOINTS, spec=make_spec(storage={"existingClaim": "team"})),
        c.FAILED,
        c.REASON_VOLUME_HOLDS_OTHER_RUN,
        "This run's folder runs/r/ on claim r-workspace holds the files of an earlier TrainingRun named r, and the "
        "spec (checkpoints.dir, output.dir) is fixed. Apply this spec under another name, or delete this run, "
        "remove runs/r/ from the claim and apply it again",
    ),
    "a trainer config error: fixed in a new run": (
        observe(PREPARED, train_failed(2, "dataset.path: file not found: data/x.jsonl")),
        c.FAILED,
        c.REASON_INVALID_SPEC,
        "file not found: data/x.jsonl This run stays failed, and its spec is fixed: make the change in a new "
        "TrainingRun",
    ),
    "GPU out of memory (exit 6)": (
        observe(
            PREPARED,
            job(
                "r-train",
                pod("Failed", exit_code=6, message=trainer_says("OutOfMemory", "The GPU ran out of memory")),
                condition="Failed",
                condition_reason="PodFailurePolicy",
            ),
        ),
        c.FAILED,
        "OutOfMemory",
        "GPU ran out of memory",
    ),
    "OOMKilled": (
        observe(
            PREPARED,
            job(
                "r-train",
                pod("Failed", exit_code=137, reason="OOMKilled", age=20),
                pod("Failed", exit_code=137, reason="OOMKilled"),
                condition="Failed",
                condition_reason="BackoffLimitExceeded",
            ),
        ),
        c.FAILED,
        c.REASON_OOM,
        "spec.resources.memory=32Gi",
    ),
    "backoff limit": (
        observe(
            PREPARED,
            job(
                "r-train",
                pod("Failed", exit_code=1, age=30),
                pod("Failed", exit_code=1, message="x"),
                condition="Failed",
                condition_reason="BackoffLimitExceeded",
                spec={"backoffLimit": 1},
            ),
        ),
        c.FAILED,
        c.REASON_BACKOFF,
        "failed 2 time(s), more than its limit of 1 restart(s) allows. The last attempt exited with code 1: x",
    ),
    "deadline": (
        observe(
            PREPARED,
            job(
                "r-train", condition="Failed", condition_reason="DeadlineExceeded", spec={"activeDeadlineSeconds": 3600}
            ),
            spec=make_spec(activeDeadlineSeconds=3600),
        ),
        c.FAILED,
        c.REASON_DEADLINE,
        "spec.activeDeadlineSeconds=3600",
    ),
    "a Secret the pod needs is missing": (
        observe(
            PREPARED,
            job(
                "r-train",
                pod("Pending", waiting="CreateContainerConfigError", waiting_message='secret "hf" not found'),
            ),
            spec=make_spec(hfTokenSecret={"name": "hf", "key": "token"}),
        ),
        c.QUEUED,
        c.REASON_CONTAINER_CONFIG,
        'secret "hf" not found. Create what it names in the run\'s namespace (spec.hfTokenSecret: Secret hf, key '
        "token); the pod starts once it exists. The reference itself is fixed once a run exists: another one needs "
        "a new TrainingRun",
    ),
    "a ConfigMap key of env is missing": (
        observe(
            job(
                "r-prepare",
                pod(
                    "Pending",
                    waiting="CreateContainerConfigError",
                    waiting_message="couldn't find key k in ConfigMap ml/cm",
                ),
            ),
            spec=make_spec(
                hfTokenSecret={"name": "hf", "key": "token"},
                env=[{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}],
            ),
        ),
        c.INITIALIZING,
        c.REASON_CONTAINER_CONFIG,
        "(spec.env[0] (X): ConfigMap cm, key k)",
    ),
    "prepared earlier, its Job gone (ttlSecondsAfterFinished)": (
        observe(
            None, job("r-train", pod("Running")), previous={"conditions": [{"type": "Initialized", "status": "True"}]}
        ),
        c.RUNNING,
        "Training",
        "Training.",
    ),
    "prepared earlier, both Jobs gone": (
        observe(previous={"phase": c.RUNNING, "jobName": "r-train"}),
        c.QUEUED,
        "Starting",
        "resumes from the newest checkpoint",
    ),
    "suspended before training started: no training Job": (
        observe(PREPARED, spec=make_spec(suspend=True)),
        c.SUSPENDED,
        "Suspended",
        "before training started",
    ),
    "a Kueue run's suspension deleted its Job": (
        observe(PREPARED, spec=make_spec(suspend=True, queueName="q"), previous={"jobName": "r-train"}),
        c.SUSPENDED,
        "Suspended",
        "checkpoint saved; set spec.suspend: false to resume",
    ),
    # A deleted training Job (a Kueue suspension, a retry) frees its name at once; its pod still saves.
    "a deleted training Job's pod still runs: no new Job yet": (
        observe(
            PREPARED,
            previous={"phase": c.SUSPENDED, "jobName": "r-train"},
            pods=(pod("Running", owner="old-train-uid", deleting=True),),
        ),
        c.QUEUED,
        c.REASON_OLD_PODS,
        "Waiting for pod p-Running-None-10, left from an earlier Job of this run, to stop before the training Job",
    ),
    "a retry waits for the failed Job's last pod to stop": (
        observe(
            PREPARED,
            previous={"phase": c.QUEUED, "reason": c.REASON_RETRYING, "jobName": "r-train"},
            pods=(pod("Running", owner="old-train-uid", deleting=True),),
        ),
        c.QUEUED,
        c.REASON_OLD_PODS,
        "two trainers must not share the run's volume",
    ),
    "a Kueue run's suspension deleted its Job; the trainer still saves": (
        observe(
            PREPARED,
            spec=make_spec(suspend=True, queueName="q"),
            previous={"jobName": "r-train"},
            pods=(pod("Running", owner="old-train-uid", deleting=True),),
        ),
        c.SUSPENDED,
        c.REASON_SUSPENDING,
        "saving a checkpoint",
    ),
    "a deleted training Job's pod that has stopped holds nothing back": (
        observe(
            PREPARED,
            previous={"phase": c.SUSPENDED, "jobName": "r-train"},
            pods=(pod("Failed", exit_code=143, owner="old-train-uid", deleting=True),),
        ),
        c.QUEUED,
        c.REASON_STARTING,
        "Creating the training Job",
    ),
    "the run's own Jobs' pods are no old pods": (
        observe(
            PREPARED, job("r-train", pod("Running", owner="r-train-uid")), pods=(pod("Running", owner="r-train-uid"),)
        ),
        c.RUNNING,
        c.REASON_TRAINING,
        "Training.",
    ),
    "the API server refused a child": (
        replace(observe(PREPARED), create_error="The API server refused to create Job r-train (422): bad."),
        c.FAILED,
        c.REASON_CREATE_FAILED,
        "refused to create Job r-train (422)",
    ),
    "an old run's child holds a name": (
        replace(observe(), blocked=(c.REASON_BLOCKED, "ConfigMap r-config still exists from an earlier run")),
        c.PENDING,
        c.REASON_BLOCKED,
        "ConfigMap r-config",
    ),
    "the spec turned invalid while training": (
        observe(PREPARED, job("r-train", pod("Running")), invalid="Invalid spec: spec.maxRestarts: bad."),
        c.SUSPENDED,
        c.REASON_INVALID_SPEC,
        "spec.maxRestarts: bad. The run is stopped (its Jobs suspended, its checkpoints kept). This can be undone",
    ),
    # Kubernetes 1.31+: FailureTarget / SuccessCriteriaMet come first, Failed / Complete once the pods are gone.
    "the Job failed (FailureTarget), its pods still stopping": (
        observe(
            PREPARED,
            train_failed(
                3, "Preflight failed: gpu.cuda: 1 GPU(s) requested but CUDA sees none", condition="FailureTarget"
            ),
        ),
        c.FAILED,
        "PreflightFailed",
        "gpu.cuda: 1 GPU(s) requested",
    ),
    "the Job ran past its deadline (FailureTarget)": (
        observe(
            PREPARED,
            job(
                "r-train",
                pod("Running", deleting=True),
                condition="FailureTarget",
                condition_reason="DeadlineExceeded",
                spec={"activeDeadlineSeconds": 3600},
            ),
            spec=make_spec(activeDeadlineSeconds=3600),
        ),
        c.FAILED,
        c.REASON_DEADLINE,
        "spec.activeDeadlineSeconds=3600",
    ),
    "the Job succeeded (SuccessCriteriaMet)": (
        observe(
            PREPARED,
            job("r-train", pod("Succeeded", exit_code=0, reason="Completed"), condition="SuccessCriteriaMet"),
        ),
        c.SUCCEEDED,
        "Completed",
        "on volume r-workspace",
    ),
    "created suspended: nothing is made": (
        observe(spec=make_spec(suspend=True)),
        c.SUSPENDED,
        c.REASON_SUSPENDED,
        "nothing is created until spec.suspend is false",
    ),
    "suspended while preparing, its pod stopping": (
        observe(job("r-prepare", pod("Running", deleting=True), suspended=True), spec=make_spec(suspend=True)),
        c.SUSPENDED,
        c.REASON_SUSPENDING,
        "The prepare pod is stopping.",
    ),
    "suspended while preparing": (
        observe(job("r-prepare", suspended=True), spec=make_spec(suspend=True)),
        c.SUSPENDED,
        c.REASON_SUSPENDED,
        "Suspended while preparing; set spec.suspend: false to resume",
    ),
    "a prepare Job suspended while preparing failed stays failed": (
        observe(
            job("r-prepare", pod("Failed", exit_code=1), suspended=True, condition="Failed", condition_reason="x"),
            spec=make_spec(suspend=True),
        ),
        c.FAILED,
        c.REASON_BACKOFF,
        "fix the cause in a new TrainingRun",
    ),
    "a ResourceQuota keeps the Job controller from creating the training pod": (
        observe(PREPARED, replace(job("r-train"), create_failure=QUOTA)),
        c.QUEUED,
        c.REASON_QUOTA,
        f"The Job controller cannot create the train pod: {QUOTA}. Free room in that ResourceQuota",
    ),
    "a missing PriorityClass keeps the Job controller from creating the prepare pod": (
        observe(replace(job("r-prepare"), create_failure=NO_PRIORITY_CLASS)),
        c.INITIALIZING,
        c.REASON_POD_CREATE_FAILED,
        'cannot create the prepare pod: Error creating: pods "r-prepare-a1b2c" is forbidden: no PriorityClass with '
        "name high was found. Remove the cause it names",
    ),
    "no replacement pod for a failed one: the quota is full": (
        observe(PREPARED, replace(job("r-train", pod("Failed", exit_code=1)), create_failure=QUOTA)),
        c.QUEUED,
        c.REASON_QUOTA,
        "exceeded quota: gpu-quota",
    ),
    "the run's volume was kept from an earlier run of its name": (
        replace(observe(job("r-prepare", pod("Running"))), earlier_volume=True),
        c.INITIALIZING,
        c.REASON_VOLUME_OF_EARLIER_RUN,
        "Volume r-workspace existed before this run (an earlier TrainingRun named r kept it)",
    ),
    "... and it says so while it prepares": (
        observe(job("r-prepare", pod("Running")), previous={"reason": c.REASON_VOLUME_OF_EARLIER_RUN}),
        c.INITIALIZING,
        c.REASON_VOLUME_OF_EARLIER_RUN,
        "delete this run and PersistentVolumeClaim r-workspace before applying it again",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_phase_reason_and_message(case):
    obs, phase, reason, text = CASES[case]
    derived = derive(obs)
    assert (derived.phase, derived.reason) == (phase, reason)
    assert text in derived.message
    assert derived.status["phase"] == phase
    assert set(derived.status) <= set(api.TrainingRunStatus.OPERATOR_FIELDS), "never the trainer's fields"


def test_an_image_that_never_pulls_stops_the_job():
    assert derive(CASES["image never pulls"][0]).stop_jobs is True
    assert derive(CASES["image pulling, within grace"][0]).stop_jobs is False


def test_an_image_that_never_pulls_stops_the_job_also_later():
    failed = derive(CASES["image never pulls"][0]).status
    later = derive(observe(PREPARED, job("r-train", pod("Pending", waiting="ImagePullBackOff")), previous=failed))
    assert (later.phase, later.stop_jobs) == (c.FAILED, True)


def later(obs: Observation, **changes: Any) -> Observation:
    """The same run one spec change later (generation 2), the status as the first pass wrote it."""
    return replace(obs, generation=2, previous=derive(obs).status, **changes)


@pytest.mark.parametrize(
    ("case", "changes"),
    [
        ("diverged (exit 4)", {"train": job("r-train", suspended=True)}),  # a suspend toggle on a failed run
        ("diverged (exit 4)", {"spec": make_spec(maxRestarts=10)}),  # a raised limit does not undo divergence
        ("succeeded", {"prepare": None, "train": None}),  # its Jobs gone (ttlSecondsAfterFinished)
        ("succeeded", {"spec": make_spec(suspend=True)}),
        ("backoff limit", {"spec": make_spec(maxRestarts=1)}),  # not raised above the Job's backoffLimit
        ("deadline", {"spec": make_spec(activeDeadlineSeconds=3000)}),  # lowered
        ("image never pulls", {"spec": make_spec(maxRestarts=10)}),
    ],
)
def test_succeeded_and_failed_are_absorbing(case, changes):
    first = derive(CASES[case][0])
    again = derive(later(CASES[case][0], **changes))
    assert (again.phase, again.reason, again.message) == (first.phase, first.reason, first.message)
    assert again.retry is False
    assert again.status["completionTime"] == first.status["completionTime"]
    assert again.status["observedGeneration"] == 2


@pytest.mark.parametrize(
    ("case", "spec", "says"),
    [
        ("backoff limit", make_spec(maxRestarts=4), "spec.maxRestarts was raised from 1 to 4"),
        ("deadline", make_spec(activeDeadlineSeconds=7200), "raised from 3600s to 7200s"),
        ("deadline", make_spec(), "spec.activeDeadlineSeconds was removed"),
    ],
)
def test_a_run_that_failed_on_a_limit_retries_when_the_limit_is_raised(case, spec, says):
    failed = CASES[case][0]
    retried = derive(later(failed, spec=spec))
    assert (retried.phase, retried.reason, retried.retry) == (c.QUEUED, c.REASON_RETRYING, True)
    assert says in retried.message and "resumes from the newest checkpoint" in retried.message
    assert "completionTime" not in retried.status, "the run has not ended any more"
    assert "raise" in derive(failed).message.lower(), "the failure says how to retry"
    # The failed Job once deleted (by the operator, to replace it): the next pass creates its replacement.
    gone = derive(replace(failed, train=None, generation=2, previous=retried.status))
    assert (gone.phase, gone.reason, gone.retry) == (c.QUEUED, c.REASON_RETRYING, False)
    # Retrying written, the failed Job's deletion lost (an API error, an operator restart): delete it again,
    # with no Failed in between.
    again = derive(replace(failed, spec=spec, generation=2, previous=retried.status))
    assert (again.phase, again.reason, again.retry) == (c.QUEUED, c.REASON_RETRYING, True)
    assert again.message == retried.message and again.status == retried.status, "no second patch, no Event"


@pytest.mark.parametrize("case", ["backoff limit", "OOMKilled", "diverged (exit 4)"])
def test_a_failed_job_beside_a_retrying_status_is_a_retry_only_if_its_limit_was_raised(case):
    """A replacement Job has the spec's limits: when it fails, the run fails (it is no retry to do)."""
    failed = CASES[case][0]
    retrying = {"phase": c.QUEUED, "reason": c.REASON_RETRYING, "jobName": "r-train"}
    spec = make_spec(maxRestarts=1)  # the backoff limit the failed Job has
    assert derive(replace(failed, spec=spec, previous=retrying)).summary == (c.FAILED, CASES[case][2])
    # And raised above the Job's own limit, only a failure on that limit retries: not an OOM, not divergence.
    raised = derive(replace(failed, spec=make_spec(maxRestarts=9), previous=retrying))
    assert raised.retry is (case == "backoff limit")


def test_the_job_controllers_failed_create_events_are_read_only_for_a_job_without_a_pod_past_the_grace():
    made = job("r-train", status={"startTime": ago(30)})
    made = replace(made, created=ago(60))
    assert awaits_pod(made, NOW, grace=20)
    assert not awaits_pod(made, NOW, grace=45), "counted from the Job's start: a resumed Job's startTime moves"
    assert not awaits_pod(replace(made, created=ago(5), start_time=None), NOW, grace=20), "just made"
    assert not awaits_pod(replace(made, suspended=True), NOW, grace=20), "suspended: no pod is due (Kueue's wait)"
    assert not awaits_pod(replace(made, pods=(PodView.from_dict(pod("Pending")),)), NOW, grace=20)
    assert awaits_pod(replace(made, pods=(PodView.from_dict(pod("Failed", exit_code=1, age=30)),)), NOW, grace=20)
    between = replace(made, pods=(PodView.from_dict(pod("Failed", exit_code=1, age=10)),))
    assert not awaits_pod(between, NOW, grace=20), "counted from the newest pod too: the Job's backoff between pods"
    done = job("r-train", condition="Complete")
    assert not awaits_pod(replace(done, created=ago(60)), NOW, grace=20)


def failed_create(message: str, seconds_ago: float, count: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"name": f"r-train.{seconds_ago}", "creationTimestamp": ago(600)},
        "reason": c.EVENT_FAILED_CREATE,
        "type": "Warning",
        "message": message,
        "count": count,
        "lastTimestamp": ago(seconds_ago),
    }


def test_the_latest_failed_create_event_since_the_jobs_last_start_and_pod_says_why():
    made = replace(job("r-train", status={"startTime": ago(120)}), created=ago(300))
    events = [failed_create("old", 200), failed_create(QUOTA, 5, count=7), failed_create("older", 60)]
    assert pod_create_failure(events, made) == QUOTA
    assert pod_create_failure([failed_create("before the resume", 200)], made) is None
    with_pod = replace(made, pods=(PodView.from_dict(pod("Failed", exit_code=1, age=30)),))
    assert pod_create_failure([failed_create("before the last pod", 60)], with_pod) is None
    assert pod_create_failure([failed_create(QUOTA, 10)], with_pod) == QUOTA
    assert pod_create_failure([], made) is None


def test_the_failure_says_the_retry_needs_the_failed_job_when_a_ttl_deletes_it():
    obs = replace(CASES["backoff limit"][0], spec=make_spec(ttlSecondsAfterFinished=600))
    assert "within ttlSecondsAfterFinished=600s, while the failed Job is kept" in derive(obs).message


def test_a_failed_prepare_says_to_fix_it_in_a_new_run_not_to_raise_max_restarts():
    failed = job("r-prepare", pod("Failed", exit_code=1), condition="Failed", condition_reason="BackoffLimitExceeded")
    message = derive(observe(failed)).message
    assert "in a new TrainingRun" in message and "maxRestarts" not in message


def named(name: str, phase: str = "Running", **kwargs: Any) -> dict[str, Any]:
    made = pod(phase, **kwargs)
    made["metadata"]["name"] = name
    return made


def test_restarts_count_pods_that_ended_and_were_replaced_unless_the_run_was_suspended():
    ledger = PodLedger()
    assert ledger.look(job("r-train", named("a")), suspended=False) == 0
    assert ledger.look(job("r-train", named("b")), suspended=False) == 1  # "a" vanished (evicted), "b" replaced it
    assert ledger.look(job("r-train"), suspended=True) == 1  # "b" stopped by the suspension: excused
    assert ledger.look(job("r-train", named("c")), suspended=False) == 1
    crashed = named("c", "Failed", exit_code=1)
    assert ledger.look(job("r-train", crashed), suspended=False) == 1, "not replaced yet"
    assert ledger.look(job("r-train", crashed, named("d")), suspended=False) == 2
    assert ledger.look(job("r-train", crashed, named("d")), suspended=False) == 2, "each pod counts once"


def test_a_final_failure_is_not_a_restart():
    """maxRestarts 1: two pods fail, the second is not replaced; restarts is 1, as its description says."""
    ledger = PodLedger()
    ledger.look(job("r-train", named("a")), suspended=False)
    ledger.look(job("r-train", named("a", "Failed", exit_code=1), named("b")), suspended=False)
    final = job(
        "r-train",
        named("a", "Failed", exit_code=1),
        named("b", "Failed", exit_code=1),
        condition="Failed",
        condition_reason="BackoffLimitExceeded",
    )
    assert ledger.look(final, suspended=False) == 1
    # A retry's new Job replaces the final failure: now it was a restart.
    assert ledger.look(None, suspended=False) == 1
    assert ledger.look(job("r-train", named("c")), suspended=False) == 2


def test_a_kueue_suspension_that_deletes_the_job_is_not_a_restart():
    ledger = PodLedger()
    ledger.look(job("r-train", named("a")), suspended=False)
    assert ledger.look(None, suspended=True) == 0  # the Job was deleted to suspend the run
    assert ledger.look(job("r-train", named("b")), suspended=False) == 0


def test_restarts_after_an_operator_restart_come_from_the_failed_pods_still_there():
    ledger = PodLedger()
    seen = job("r-train", named("a", "Failed", exit_code=1), named("b", "Failed", exit_code=1), named("c"))
    assert ledger.look(seen, suspended=False) == 2


def test_restarts_never_go_down():
    gone = observe(PREPARED, job("r-train", pod("Running")), previous={"restarts": 3})  # an operator restart
    assert derive(gone).status["restarts"] == 3


def test_times_and_conditions():
    started = job("r-train", pod("Running"), status={"startTime": "2026-11-22T11:58:00Z"})
    running = derive(observe(PREPARED, started)).status
    assert running["startTime"] == "2026-11-22T11:58:00Z", "the Job's startTime, not when the operator looked"
    conditions = {x["type"]: x for x in running["conditions"]}
    assert conditions["Initialized"]["status"] == "True"
    assert conditions["Running"]["status"] == "True"
    assert conditions["Failed"]["status"] == "False"
    assert "Admitted" not in conditions, "only runs with a queueName have it"

    later_now = NOW + timedelta(minutes=5)
    again = derive(replace(observe(PREPARED, started), now=later_now, previous=running)).status
    assert again == running, "nothing changed: the same status, so no patch"

    done = job(
        "r-train",
        pod("Succeeded", exit_code=0, reason="Completed"),
        condition="Complete",
        status={"startTime": "2026-11-22T12:01:00Z", "completionTime": "2026-11-22T12:04:00Z"},
    )
    finished = derive(replace(observe(PREPARED, done), now=later_now, previous=again)).status
    moved = {x["type"]: x["lastTransitionTime"] for x in finished["conditions"]}
    assert moved["Running"] == moved["Succeeded"] == "2026-11-22T12:05:00Z"
    assert finished["completionTime"] == "2026-11-22T12:04:00Z", "the Job's completionTime"
    assert finished["startTime"] == "2026-11-22T11:58:00Z", "the first start stays (a resumed Job's moves)"
    assert finished["output"] == {"volume": "r-workspace", "path": "/workspace/output"}


def test_a_run_seen_only_once_it_succeeded_still_gets_its_start_and_end():
    done = job(
        "r-train",
        pod("Succeeded", exit_code=0, reason="Completed"),
        condition="Complete",
        status={"startTime": "2026-11-22T10:00:00Z", "completionTime": "2026-11-22T11:00:00Z"},
    )
    status = derive(observe(PREPARED, done)).status
    assert (status["startTime"], status["completionTime"]) == ("2026-11-22T10:00:00Z", "2026-11-22T11:00:00Z")


def test_a_failed_run_ends_when_its_job_failed():
    status = derive(CASES["backoff limit"][0]).status
    assert status["completionTime"] == "2026-11-22T11:30:00Z"


def admitted(status: dict[str, Any]) -> tuple[str, str]:
    cond = next(x for x in status["conditions"] if x["type"] == "Admitted")
    return cond["status"], cond["reason"]


def test_kueue_runs_have_an_admitted_condition():
    spec = make_spec(queueName="q")
    labels = {c.LABEL_KUEUE_QUEUE: "q"}
    waiting = derive(observe(PREPARED, job("r-train", suspended=True, labels=labels), spec=spec)).status
    assert admitted(waiting) == ("False", c.REASON_KUEUE)
    running = derive(observe(PREPARED, job("r-train", pod("Running"), labels=labels), spec=spec, previous=waiting))
    assert admitted(running.status) == ("True", c.REASON_ADMITTED)
    done = job("r-train", pod("Succeeded", exit_code=0), condition="Complete", labels=labels)
    finished = derive(observe(PREPARED, done, spec=spec, previous=running.status)).status
    gone = derive(observe(spec=spec, previous=finished)).status  # its Jobs deleted by their TTL
    assert admitted(gone) == ("True", c.REASON_ADMITTED), "a finished run keeps what was"


def test_pod_view_reads_a_real_pod_status():
    view = PodView.from_dict(pod("Failed", exit_code=3, message=trainer_says("PreflightFailed", "nope")))
    assert (view.exit_code, view.terminated_reason, view.disrupted) == (3, "Error", False)


def test_the_trainers_refusal_of_another_runs_files_exits_as_a_config_error():
    """status.py tells it from other exit-2 failures by the reason in the termination message."""
    from kubetune_trainer.errors import OtherRunError

    assert c.FAILJOB_EXIT_CODES[OtherRunError.exit_code] == c.REASON_INVALID_SPEC
