"""The operator's /metrics: a collector over the runs it watches, and its own reconcile counts and durations.

Run series are computed at scrape time from the latest TrainingRun bodies kopf delivered, so
they cannot drift from the status and vanish when a run is deleted (no stale label sets to
clean up). The trainer pod exports the same progress at step resolution (kubetune_trainer_*);
these come from the status, which the trainer updates every few seconds, and exist for every
run even where no PodMonitor scrapes trainer pods.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kubetune_operator import constants as c
from kubetune_operator.kube import ChildBlocked

LABELS = ["namespace", "run"]

# name -> (help, status.progress field) for the gauges read straight from the progress record.
PROGRESS_GAUGES: dict[str, tuple[str, str]] = {
    "kubetune_run_step": ("Optimizer steps done.", "step"),
    "kubetune_run_total_steps": ("Optimizer steps of the whole run.", "totalSteps"),
    "kubetune_run_train_loss": ("Latest logged training loss (absent when not finite).", "trainLoss"),
    "kubetune_run_eval_loss": ("Latest validation loss.", "evalLoss"),
    "kubetune_run_learning_rate": ("Current learning rate.", "learningRate"),
    "kubetune_run_grad_norm": ("Latest logged gradient norm.", "gradNorm"),
    # A gauge, not a counter rebuilt from the status: a run resumed from an older checkpoint counts its
    # tokens back, which rate() would read as a counter reset and a spike.
    "kubetune_run_tokens_per_second": ("Non-padding tokens trained per second, recent steps.", "tokensPerSecond"),
    "kubetune_run_eta_seconds": ("Estimated seconds left.", "etaSeconds"),
    "kubetune_run_gpu_memory_peak_bytes": ("Peak GPU memory allocated by the trainer.", "gpuMemoryPeakBytes"),
}
# name -> help, for the series every run has.
RUN_SERIES: dict[str, str] = {
    "kubetune_run_progress_ratio": "Share of the run's steps done, 0 to 1.",
    "kubetune_run_restarts_total": "Times the run's trainer was restarted (preemption, eviction, crash).",
    "kubetune_run_non_finite_steps_total": (
        "Optimizer steps the run's current trainer skipped for a non-finite loss or gradients "
        "(status.progress.nonFiniteSteps; back to 0 when a new trainer starts)."
    ),
    "kubetune_run_last_progress_timestamp_seconds": (
        "Unix time of the trainer's last progress report, or of the run's (re)entry into Running when later: "
        "the stall alert's clock."
    ),
    "kubetune_run_phase_transition_timestamp_seconds": (
        "Unix time the run entered its current phase: the last change of its phase conditions (Initialized, "
        "Running, Suspended, Succeeded, Failed; not Kueue's Admitted), its creation before any. Pending and "
        "Initializing share one clock until the data is prepared."
    ),
}
# The conditions that flip when the phase changes. Admitted is not one: Kueue admits a run that then waits
# for GPUs, still Queued, and that run's clock must not start over. Other condition types do not count either.
PHASE_CONDITIONS = frozenset(c.CONDITION_TYPES) - {c.CONDITION_ADMITTED}
COUNTERS = frozenset({"kubetune_run_restarts_total", "kubetune_run_non_finite_steps_total"})
RUN_METRICS = ("kubetune_run_phase", *PROGRESS_GAUGES, *RUN_SERIES)
OPERATOR_METRICS = ("kubetune_operator_reconciles_total", "kubetune_operator_reconcile_duration_seconds")


def timestamp(text: str | None) -> float | None:
    """RFC 3339 (as Kubernetes and the trainer write it) to Unix seconds."""
    if not text or not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _latest(*moments: float | None) -> float | None:
    known = [m for m in moments if m is not None]
    return max(known) if known else None


def run_samples(body: dict[str, Any]) -> dict[str, Any]:
    """What one run contributes: {metric: value} plus "phase". Pure, so tests need no registry."""
    status = body.get("status") or {}
    progress = status.get("progress") or {}
    conditions = [cond for cond in status.get("conditions") or [] if isinstance(cond, dict)]
    phase = status.get("phase") or c.PENDING
    out: dict[str, Any] = {"phase": phase}
    for name, (_, key) in PROGRESS_GAUGES.items():
        if (value := _number(progress.get(key))) is not None:
            out[name] = value
    step, total = _number(progress.get("step")), _number(progress.get("totalSteps"))
    if phase == c.SUCCEEDED:
        out["kubetune_run_progress_ratio"] = 1.0  # early stopping ends short of totalSteps, and is done
    elif step is not None and total:
        out["kubetune_run_progress_ratio"] = step / total
    out["kubetune_run_restarts_total"] = _number(status.get("restarts")) or 0.0
    # 0 until the trainer counts: the series exists from the run's creation, so increase() sees the first rise.
    out["kubetune_run_non_finite_steps_total"] = _number(progress.get("nonFiniteSteps")) or 0.0
    # The last sign of life: the trainer's last progress record, or the moment the run (re)entered Running
    # (after Suspended, Queued or a restart the old record is no news of a stall), or its start (a run that
    # hangs before its first step stalls too).
    running = next((cond for cond in conditions if cond.get("type") == c.CONDITION_RUNNING), {})
    last = _latest(
        timestamp(progress.get("lastUpdateTime")),
        timestamp(running.get("lastTransitionTime")) if running.get("status") == "True" else None,
        timestamp(status.get("startTime")),
    )
    if last is not None:
        out["kubetune_run_last_progress_timestamp_seconds"] = last
    # Every phase change flips one of PHASE_CONDITIONS, and a condition's lastTransitionTime moves only when
    # its status does; persisted in the status, this clock survives operator restarts and scrape gaps, which
    # reset a rule's `for:`. Other conditions (Admitted) change within a phase: they do not count.
    since = _latest(
        *(timestamp(cond.get("lastTransitionTime")) for cond in conditions if cond.get("type") in PHASE_CONDITIONS)
    ) or timestamp((body.get("metadata") or {}).get("creationTimestamp"))
    if since is not None:
        out["kubetune_run_phase_transition_timestamp_seconds"] = since
    return out


class RunCollector(Collector):
    """Collects, at each scrape, from `bodies()`: the TrainingRuns the operator currently knows."""

    def __init__(self, bodies: Callable[[], list[dict[str, Any]]]) -> None:
        self.bodies = bodies

    def collect(self) -> Iterator[Metric]:
        phase = GaugeMetricFamily(
            "kubetune_run_phase", "1 for the run's current phase, 0 for the others.", labels=[*LABELS, "phase"]
        )
        families: dict[str, Metric] = {
            name: GaugeMetricFamily(name, doc, labels=LABELS) for name, (doc, _) in PROGRESS_GAUGES.items()
        }
        for name, doc in RUN_SERIES.items():
            family = CounterMetricFamily if name in COUNTERS else GaugeMetricFamily
            families[name] = family(name, doc, labels=LABELS)
        for body in self.bodies():
            meta = body.get("metadata") or {}
            labels = [meta.get("namespace", ""), meta.get("name", "")]
            samples = run_samples(body)
            for p in c.PHASES:
                phase.add_metric([*labels, p], 1.0 if samples["phase"] == p else 0.0)
            for name, family in families.items():
                if name in samples:
                    family.add_metric(labels, samples[name])
        yield phase
        yield from families.values()


class OperatorMetrics:
    """One registry per operator start (the operator restarts in-process in tests; no global state)."""

    def __init__(self, bodies: Callable[[], list[dict[str, Any]]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(RunCollector(bodies))
        self.reconciles = Counter(
            "kubetune_operator_reconciles",
            "Reconcile passes by what started them (run, job, resync) and how they ended: ok, waiting (for "
            "something outside the operator: a full ResourceQuota, an old run's children) or error.",
            ["trigger", "result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "kubetune_operator_reconcile_duration_seconds",
            "Time of one reconcile pass (observe, act, patch status).",
            ["trigger"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self._server: Any = None

    def observe(self, trigger: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            result = fn()
        except ChildBlocked:  # the user's side: the status says what it waits for; no operator error
            self.reconciles.labels(trigger, "waiting").inc()
            raise
        except BaseException:
            self.reconciles.labels(trigger, "error").inc()
            raise
        finally:
            self.duration.labels(trigger).observe(time.perf_counter() - started)
        self.reconciles.labels(trigger, "ok").inc()
        return result

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
