"""The operator's run series, from TrainingRun bodies: tables over run_samples, the collector and observe()."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_operator import constants as c
from kubetune_operator.kube import ChildBlocked
from kubetune_operator.metrics import OperatorMetrics, run_samples

T0 = datetime(2026, 11, 22, 10, tzinfo=timezone.utc)


def at(minutes: float) -> str:
    """T0 plus some minutes, as RFC 3339 (how the status writes times)."""
    return (T0 + timedelta(minutes=minutes)).isoformat(timespec="seconds").replace("+00:00", "Z")


def unix(minutes: float) -> float:
    return (T0 + timedelta(minutes=minutes)).timestamp()


def cond(kind: str, status: str, minutes: float) -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": "R", "lastTransitionTime": at(minutes)}


def make_run(
    phase: str | None = "Running",
    progress: dict[str, Any] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    created: float | None = -5,
    **status: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": "ml", "name": "r1"}
    if created is not None:
        meta["creationTimestamp"] = at(created)
    body: dict[str, Any] = {"metadata": meta, "status": {**status}}
    if phase is not None:
        body["status"]["phase"] = phase
    if progress is not None:
        body["status"]["progress"] = progress
    if conditions is not None:
        body["status"]["conditions"] = conditions
    return body


LAST = "kubetune_run_last_progress_timestamp_seconds"
SINCE = "kubetune_run_phase_transition_timestamp_seconds"
RATIO = "kubetune_run_progress_ratio"


@pytest.mark.parametrize(
    ("body", "metric", "expected"),
    [
        # The stall clock: the last report, else the start; the (re)entry into Running when later.
        (make_run(startTime=at(0)), LAST, unix(0)),
        (make_run(progress={"lastUpdateTime": at(3)}, startTime=at(0)), LAST, unix(3)),
        (
            make_run(progress={"lastUpdateTime": at(3)}, conditions=[cond("Running", "True", 60)], startTime=at(0)),
            LAST,
            unix(60),
        ),
        (
            make_run(progress={"lastUpdateTime": at(61)}, conditions=[cond("Running", "True", 60)], startTime=at(0)),
            LAST,
            unix(61),
        ),
        # Running is False (Suspended): its transition is no sign of life.
        (
            make_run("Suspended", progress={"lastUpdateTime": at(3)}, conditions=[cond("Running", "False", 60)]),
            LAST,
            unix(3),
        ),
        (make_run(progress={"lastUpdateTime": "yesterday"}, startTime=at(1)), LAST, unix(1)),
        # The phase clock: the latest condition change, the creation before any condition.
        (make_run("Pending"), SINCE, unix(-5)),
        (
            make_run(
                "Queued",
                conditions=[cond("Initialized", "True", 12), cond("Running", "False", 2), cond("Failed", "False", 2)],
            ),
            SINCE,
            unix(12),
        ),
        (
            make_run("Running", conditions=[cond("Initialized", "True", 12), cond("Running", "True", 40)]),
            SINCE,
            unix(40),
        ),
        # Kueue admitted a run at 50 that still waits for GPUs: it is Queued since 12, not since its admission.
        (
            make_run(
                "Queued",
                conditions=[
                    cond("Initialized", "True", 12),
                    cond("Admitted", "True", 50),
                    cond("Running", "False", 2),
                    cond("Suspended", "False", 2),
                ],
            ),
            SINCE,
            unix(12),
        ),
        # ... and preempted (Admitted False, Running False at 90): Queued again since 90.
        (
            make_run(
                "Queued",
                conditions=[
                    cond("Initialized", "True", 12),
                    cond("Admitted", "False", 90),
                    cond("Running", "False", 90),
                ],
            ),
            SINCE,
            unix(90),
        ),
        # Only Admitted changed since the creation (no other condition yet): the creation.
        (make_run("Pending", conditions=[cond("Admitted", "False", 3)]), SINCE, unix(-5)),
        # A condition type the operator does not set (another controller's) is no phase change either.
        (make_run("Running", conditions=[cond("Running", "True", 40), cond("Ready", "True", 70)]), SINCE, unix(40)),
        # The ratio: steps over total; 1.0 once Succeeded, even when early stopping ended short of the total.
        (make_run(progress={"step": 5, "totalSteps": 20}), RATIO, 0.25),
        (make_run("Succeeded", progress={"step": 7, "totalSteps": 20}), RATIO, 1.0),
        (make_run("Succeeded"), RATIO, 1.0),
        # Counters every run has from its creation, so increase() sees the first rise.
        (make_run(progress={"nonFiniteSteps": 3}), "kubetune_run_non_finite_steps_total", 3.0),
        (make_run(progress={"step": 1}), "kubetune_run_non_finite_steps_total", 0.0),
        (make_run(restarts=2), "kubetune_run_restarts_total", 2.0),
        (make_run(), "kubetune_run_restarts_total", 0.0),
        (make_run(progress={"gpuMemoryPeakBytes": 1 << 30}), "kubetune_run_gpu_memory_peak_bytes", float(1 << 30)),
        (make_run(None), "phase", "Pending"),  # no status yet
    ],
)
def test_run_samples(body: dict[str, Any], metric: str, expected: Any) -> None:
    assert run_samples(body)[metric] == expected


@pytest.mark.parametrize(
    ("body", "absent"),
    [
        # Not known yet, or null in the status (a NaN loss): absent, never a misleading 0.
        (make_run(progress={"trainLoss": None, "evalLoss": None, "step": 3}), {"kubetune_run_train_loss"}),
        (make_run(progress={"step": 3}), {"kubetune_run_eval_loss", "kubetune_run_gpu_memory_peak_bytes", RATIO}),
        (make_run(progress={"step": True, "totalSteps": "ten"}), {"kubetune_run_step", RATIO}),
        (make_run("Pending", created=None), {LAST, SINCE, RATIO}),
    ],
)
def test_unknown_values_are_absent(body: dict[str, Any], absent: set[str]) -> None:
    assert not absent & set(run_samples(body))


def scrape(metrics: OperatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.parametrize("phase", c.PHASES)
def test_the_phase_is_a_state_set_of_all_seven(phase: str) -> None:
    samples = scrape(OperatorMetrics(lambda: [make_run(phase)]))
    states = {dict(labels)["phase"]: v for (name, labels), v in samples.items() if name == "kubetune_run_phase"}
    assert states == {p: (1.0 if p == phase else 0.0) for p in c.PHASES}


def test_the_collector_labels_each_run_and_a_deleted_run_vanishes() -> None:
    runs = [
        make_run(progress={"step": 4, "totalSteps": 8, "trainLoss": 2.5}),
        {**make_run("Queued"), "metadata": {"namespace": "other", "name": "r2"}},
    ]
    metrics = OperatorMetrics(lambda: list(runs))
    samples = scrape(metrics)
    key = (("namespace", "ml"), ("run", "r1"))
    assert samples[("kubetune_run_step", key)] == 4
    assert samples[("kubetune_run_train_loss", key)] == 2.5
    assert samples[(RATIO, key)] == 0.5
    assert samples[("kubetune_run_restarts_total", (("namespace", "other"), ("run", "r2")))] == 0
    runs.pop(0)
    assert not [k for k in scrape(metrics) if ("run", "r1") in k[1]]


def test_observe_counts_errors_and_times_every_pass() -> None:
    metrics = OperatorMetrics(lambda: [])

    def fails() -> None:
        raise RuntimeError("API down")

    assert metrics.observe("run", lambda: 7) == 7
    with pytest.raises(RuntimeError, match="API down"):
        metrics.observe("run", fails)
    with pytest.raises(RuntimeError):
        metrics.observe("job", fails)
    samples = scrape(metrics)
    count = "kubetune_operator_reconciles_total"
    assert samples[(count, (("result", "ok"), ("trigger", "run")))] == 1
    assert samples[(count, (("result", "error"), ("trigger", "run")))] == 1
    assert samples[(count, (("result", "error"), ("trigger", "job")))] == 1
    assert (count, (("result", "ok"), ("trigger", "job"))) not in samples
    # A failed pass is timed too.
    hist = "kubetune_operator_reconcile_duration_seconds_count"
    assert samples[(hist, (("trigger", "run"),))] == 2
    assert samples[(hist, (("trigger", "job"),))] == 1


def test_a_pass_that_waits_on_the_users_side_is_no_error() -> None:
    """A full ResourceQuota or an old run's children: the run waits (its status says so), the operator is fine,
    so KubetuneOperatorReconcileErrors (result="error") must not fire for it."""
    metrics = OperatorMetrics(lambda: [])

    def blocked() -> None:
        raise ChildBlocked(c.REASON_QUOTA, "Cannot create Job r-train yet: exceeded quota")

    for _ in range(3):  # every resync
        with pytest.raises(ChildBlocked):
            metrics.observe("resync", blocked)
    samples = scrape(metrics)
    count = "kubetune_operator_reconciles_total"
    assert samples[(count, (("result", "waiting"), ("trigger", "resync")))] == 3
    assert (count, (("result", "error"), ("trigger", "resync"))) not in samples
