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

PHASES = (c.PENDING, c.INITIALIZING, c.QUEUED, c.RUNNING, c.SUSPENDED, c.SUCCEEDED, c.FAILED)
LABELS = ["namespace", "run"]

# name -> (help, status.progress field) for the gauges read straight from the progress record.
PROGRESS_GAUGES: dict[str, tuple[str, str]] = {
    "kubetune_run_step": ("Optimizer steps done.", "step"),
    "kubetune_run_total_steps": ("Optimizer steps of the whole run.", "totalSteps"),
    "kubetune_run_train_loss": ("Latest logged training loss.", "trainLoss"),
    "kubetune_run_eval_loss": ("Latest validation loss.", "evalLoss"),
    "kubetune_run_tokens_per_second": ("Non-padding tokens trained per second.", "tokensPerSecond"),
    "kubetune_run_eta_seconds": ("Estimated seconds left.", "etaSeconds"),
}
RUN_METRICS = (
    "kubetune_run_phase",
    "kubetune_run_progress_ratio",
    *PROGRESS_GAUGES,
    "kubetune_run_restarts_total",
    "kubetune_run_last_progress_timestamp_seconds",
)
OPERATOR_METRICS = ("kubetune_operator_reconciles_total", "kubetune_operator_reconcile_duration_seconds")


def timestamp(text: str | None) -> float | None:
    """RFC 3339 (as Kubernetes and the trainer write it) to Unix seconds."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def run_samples(body: dict[str, Any]) -> dict[str, Any]:
    """What one run contributes: {metric: value} plus "phase". Pure, so tests need no registry."""
    status = body.get("status") or {}
    progress = status.get("progress") or {}
    phase = status.get("phase") or c.PENDING
    out: dict[str, Any] = {"phase": phase}
    for name, (_, key) in PROGRESS_GAUGES.items():
        if (value := _number(progress.get(key))) is not None:
            out[name] = value
    step, total = _number(progress.get("step")), _number(progress.get("totalSteps"))
    if step is not None and total:
        out["kubetune_run_progress_ratio"] = step / total
    elif phase == c.SUCCEEDED:
        out["kubetune_run_progress_ratio"] = 1.0
    out["kubetune_run_restarts_total"] = _number(status.get("restarts")) or 0.0
    # The last sign of life: the trainer's last progress record, else the run's start (a run that hangs
    # before its first step stalls too).
    last = timestamp(progress.get("lastUpdateTime")) or timestamp(status.get("startTime"))
    if last is not None:
        out["kubetune_run_last_progress_timestamp_seconds"] = last
    return out


class RunCollector(Collector):
    """Collects, at each scrape, from `bodies()`: the TrainingRuns the operator currently knows."""

    def __init__(self, bodies: Callable[[], list[dict[str, Any]]]) -> None:
        self.bodies = bodies

    def collect(self) -> Iterator[Metric]:
        phase = GaugeMetricFamily(
            "kubetune_run_phase", "1 for the run's current phase, 0 for the others.", labels=[*LABELS, "phase"]
        )
        ratio = GaugeMetricFamily(
            "kubetune_run_progress_ratio", "Share of the run's steps done, 0 to 1.", labels=LABELS
        )
        gauges = {name: GaugeMetricFamily(name, doc, labels=LABELS) for name, (doc, _) in PROGRESS_GAUGES.items()}
        restarts = CounterMetricFamily(
            "kubetune_run_restarts",
            "Times the run's trainer was restarted (preemption, eviction, crash).",
            labels=LABELS,
        )
        last = GaugeMetricFamily(
            "kubetune_run_last_progress_timestamp_seconds",
            "Unix time of the trainer's last progress report (the run's start before the first).",
            labels=LABELS,
        )
        families = {
            "kubetune_run_progress_ratio": ratio,
            "kubetune_run_restarts_total": restarts,
            "kubetune_run_last_progress_timestamp_seconds": last,
            **gauges,
        }
        for body in self.bodies():
            meta = body.get("metadata") or {}
            labels = [meta.get("namespace", ""), meta.get("name", "")]
            samples = run_samples(body)
            for p in PHASES:
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
            "Reconcile passes by what started them (run, job, resync) and how they ended (ok, error).",
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
