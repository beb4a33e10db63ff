"""Status derivation, as tables: observed children in, phase/reason/message out."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from kubetune_operator import api
from kubetune_operator import constants as c
from kubetune_operator.status import JobView, Observation, PodLedger, PodView, derive

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
SPEC = {"model": {"nameOrPath": "m"}, "dataset": {"path": "d.jsonl"}}


def make_spec(**overrides: Any) -> api.TrainingRunSpec:
    return api.TrainingRunSpec.model_validate({**SPEC, **overrides})


def pod(
    phase: str = "Running",
    *,
    exit_code: int | None = None,
    reason: str | None = None,
    message: str | None = None,
    waiting: str | None = None,
    unschedulable: str | None = None,
    disrupted: bool = False,
    age: float = 10,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "reason": reason or "Error", "message": message}}
    elif waiting:
        state = {"waiting": {"reason": waiting, "message": f"Back-off pulling image: {waiting}"}}
    conditions = []
    if unschedulable:
        conditions.append(
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}
        )
    if disrupted:
        conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"})
    created = (NOW - timedelta(seconds=age)).isoformat().replace("+00:00", "Z")
    return {
        "metadata": {"name": f"p-{phase}-{exit_code}-{age}", "creationTimestamp": created},
        "status": {
            "phase": phase,
            "conditions": conditions,
            "containerStatuses": [{"name": c.CONTAINER, "state": state}],
        },
    }


def job(
    name: str, *pods: dict[str, Any], suspended: bool = False, condition: str | None = None, condition_reason: str = ""
) -> JobView:
    conditions = [{"type": condition, "status": "True", "reason": condition_reason}] if condition else []
    return JobView.from_dict(
        {"metadata": {"name": name}, "spec": {"suspend": suspended}, "status": {"conditions": conditions}},
        list(pods),
    )


PREPARED = job("r-prepare", pod("Succeeded", exit_code=0, reason="Completed"), condition="Complete")


def observe(
    prepare: JobView | None = None,
    train: JobView | None = None,
    spec: api.TrainingRunSpec | None = None,
    previous: dict[str, Any] | None = None,
    invalid: str | None = None,
) -> Observation:
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
    )


def trainer_says(reason: str, message: str) -> str:
    return json.dumps({"reason": reason, "message": message})


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
        "4 Insufficient nvidia.com/gpu. To go on: free GPUs or wait",
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
        observe(invalid="Invalid spec: spec.lora.r: Input should be greater than or equal to 1"),
        c.FAILED,
        c.REASON_INVALID_SPEC,
        "spec.lora.r",
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
        "Lower training.learningRate",
    ),
    "volume full (exit 5)": (
        observe(
            PREPARED,
            job(
                "r-train",
                pod("Failed", exit_code=5, message=trainer_says("VolumeFull", "full")),
                condition="Failed",
                condition_reason="PodFailurePolicy",
            ),
        ),
        c.FAILED,
        "VolumeFull",
        "full",
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
            ),
        ),
        c.FAILED,
        c.REASON_BACKOFF,
        "failed 2 time(s), more than spec.maxRestarts allows. The last attempt exited with code 1: x",
    ),
    "deadline": (
        observe(
            PREPARED,
            job("r-train", condition="Failed", condition_reason="DeadlineExceeded"),
            spec=make_spec(activeDeadlineSeconds=3600),
        ),
        c.FAILED,
        c.REASON_DEADLINE,
        "spec.activeDeadlineSeconds=3600",
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


def test_terminal_phases_are_sticky():
    failed = derive(CASES["diverged (exit 4)"][0]).status
    later = derive(observe(PREPARED, job("r-train", suspended=True), previous=failed))
    assert (later.phase, later.reason) == (c.FAILED, "Diverged")


def test_restarts_count_pods_that_ended_unless_the_run_was_suspended():
    ledger = PodLedger()
    first, second, third = pod("Running", age=30), pod("Running", age=20), pod("Running", age=10)
    for p, n in ((first, "a"), (second, "b"), (third, "c")):
        p["metadata"]["name"] = n
    assert ledger.look(job("r-train", first), suspended=False) == 0
    assert ledger.look(job("r-train", second), suspended=False) == 1  # "a" vanished (evicted, deleted)
    assert ledger.look(job("r-train"), suspended=True) == 1  # "b" stopped by the suspension: excused
    assert ledger.look(job("r-train", third), suspended=False) == 1
    crashed = pod("Failed", exit_code=1)
    crashed["metadata"]["name"] = "c"
    assert ledger.look(job("r-train", crashed), suspended=False) == 2
    assert ledger.look(job("r-train", crashed), suspended=False) == 2, "each pod counts once"


def test_restarts_never_go_down():
    gone = observe(PREPARED, job("r-train", pod("Running")), previous={"restarts": 3})  # an operator restart
    assert derive(gone).status["restarts"] == 3


def test_times_and_conditions():
    running = derive(CASES["running"][0]).status
    assert running["startTime"] == "2026-11-22T12:00:00Z"
    conditions = {x["type"]: x for x in running["conditions"]}
    assert conditions["Initialized"]["status"] == "True"
    assert conditions["Running"]["status"] == "True"
    assert conditions["Failed"]["status"] == "False"

    later_now = NOW + timedelta(minutes=5)
    obs = CASES["running"][0]
    again = derive(Observation(**{**obs.__dict__, "now": later_now, "previous": running})).status
    assert again["startTime"] == running["startTime"]
    same = {x["type"]: x["lastTransitionTime"] for x in again["conditions"]}
    assert same == {x["type"]: x["lastTransitionTime"] for x in running["conditions"]}, "unchanged status, same time"

    done = derive(Observation(**{**CASES["succeeded"][0].__dict__, "now": later_now, "previous": again})).status
    moved = {x["type"]: x["lastTransitionTime"] for x in done["conditions"]}
    assert moved["Running"] == moved["Succeeded"] == "2026-11-22T12:05:00Z"
    assert done["completionTime"] == "2026-11-22T12:05:00Z"
    assert done["output"] == {"volume": "r-workspace", "path": "/workspace/output"}


def test_pod_view_reads_a_real_pod_status():
    view = PodView.from_dict(pod("Failed", exit_code=3, message=trainer_says("PreflightFailed", "nope")))
    assert (view.exit_code, view.terminated_reason, view.disrupted) == (3, "Error", False)
