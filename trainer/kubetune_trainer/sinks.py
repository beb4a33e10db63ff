"""Where progress goes: the terminal, output/progress.jsonl, Prometheus, the TrainingRun's status.

Every sink gets the same records from a `Reporter`: the `Progress` of each step and event,
the checkpoint just saved, the preflight report, the final evaluation. A sink decides how
often to act. A sink that fails is logged and skipped; none may slow or stop training, so
the Kubernetes sink talks to the API from its own thread and only ever keeps the latest
state to send.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic.alias_generators import to_camel

from kubetune_trainer import contract
from kubetune_trainer.config import TrainConfig
from kubetune_trainer.report import Progress

log = logging.getLogger(__name__)


def finite_or_none(value: Any) -> Any:
    """JSON (and a Kubernetes status) has no NaN or Infinity: null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def camel(record: dict[str, Any]) -> dict[str, Any]:
    return {to_camel(k): v for k, v in record.items()}


class Sink:
    """The interface; each method may be left as it is (nothing to do for that record)."""

    def progress(self, progress: Progress, event: str | None) -> None:
        """event: None for a plain step, else 'begin', 'log', 'eval' or 'end'."""

    def checkpoint(self, info: dict[str, Any]) -> None:
        """info: {"latest": {...}, "best": {...} or None}."""

    def preflight(self, report: dict[str, Any]) -> None: ...

    def evaluation(self, results: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class Reporter:
    """Hands each record to every sink; a failing sink is logged once per kind of failure and skipped."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks
        self._complained: set[tuple[str, str]] = set()

    def _each(self, method: str, *args: Any) -> None:
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception as exc:  # reporting must never stop training
                key = (type(sink).__name__, type(exc).__name__)
                if key not in self._complained:
                    self._complained.add(key)
                    log.warning("%s failed (%s: %s); training goes on", key[0], key[1], exc)

    def progress(self, progress: Progress, event: str | None) -> None:
        self._each("progress", progress, event)

    def checkpoint(self, info: dict[str, Any]) -> None:
        self._each("checkpoint", info)

    def preflight(self, report: dict[str, Any]) -> None:
        self._each("preflight", report)

    def evaluation(self, results: dict[str, Any]) -> None:
        self._each("evaluation", results)

    def close(self) -> None:
        self._each("close")


# --------------------------------------------------------------------------- terminal


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class TerminalSink(Sink):
    """A tqdm bar on a terminal; one plain log line per logging interval otherwise."""

    def __init__(self, interactive: bool | None = None) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._bar: Any = None

    def progress(self, progress: Progress, event: str | None) -> None:
        if self.interactive:
            self._update_bar(progress, event)
        elif event in ("log", "eval"):
            log.info(self.line(progress, event))

    @staticmethod
    def line(p: Progress, event: str | None) -> str:
        if event == "eval":
            return f"step {p.step}/{p.total_steps} eval_loss {_fmt(p.eval_loss, '.4f')}"
        return (
            f"step {p.step}/{p.total_steps} ({p.percent:.0f}%) epoch {p.epoch:.2f} "
            f"loss {_fmt(p.train_loss, '.4f')} lr {_fmt(p.learning_rate, '.2e')} "
            f"tok/s {_fmt(p.tokens_per_second, ',.0f')} eta {p.eta}"
        )

    def _update_bar(self, p: Progress, event: str | None) -> None:
        from tqdm.auto import tqdm

        if self._bar is None:
            self._bar = tqdm(total=p.total_steps, initial=p.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        self._bar.n = p.step
        self._bar.set_postfix_str(
            f"loss {_fmt(p.train_loss, '.4f')} eval {_fmt(p.eval_loss, '.4f')} "
            f"tok/s {_fmt(p.tokens_per_second, ',.0f')} eta {p.eta}",
            refresh=True,
        )
        if event == "eval":
            self._bar.write(self.line(p, event))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --------------------------------------------------------------------------- file


class FileSink(Sink):
    """output/progress.jsonl: one line per logging interval and per event, to plot or tail later."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def progress(self, progress: Progress, event: str | None) -> None:
        if event is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(finite_or_none({"event": event, **camel(progress.to_dict())})) + "\n")


# --------------------------------------------------------------------------- Prometheus

# name -> (help, Progress attribute); every series is a gauge labelled with the run and its namespace.
TRAINER_METRICS: dict[str, tuple[str, str]] = {
    "kubetune_trainer_step": ("Optimizer steps done.", "step"),
    "kubetune_trainer_total_steps": ("Optimizer steps of the whole run.", "total_steps"),
    "kubetune_trainer_epoch": ("Epochs done (fractional).", "epoch"),
    "kubetune_trainer_progress_ratio": ("Share of the run's steps done, 0 to 1.", "ratio"),
    "kubetune_trainer_eta_seconds": ("Estimated seconds left.", "eta_seconds"),
    "kubetune_trainer_train_loss": ("Latest logged training loss (NaN when not finite).", "train_loss"),
    "kubetune_trainer_eval_loss": ("Latest validation loss.", "eval_loss"),
    "kubetune_trainer_learning_rate": ("Current learning rate.", "learning_rate"),
    "kubetune_trainer_grad_norm": ("Latest gradient norm.", "grad_norm"),
    "kubetune_trainer_tokens_per_second": ("Non-padding tokens trained per second, recent steps.", "tokens_per_second"),
    "kubetune_trainer_samples_per_second": ("Samples trained per second, recent steps.", "samples_per_second"),
    "kubetune_trainer_gpu_memory_bytes": ("Peak GPU memory allocated by the trainer.", "gpu_memory_bytes"),
    "kubetune_trainer_last_progress_timestamp_seconds": ("Unix time of the last optimizer step.", "timestamp"),
}


class PrometheusSink(Sink):
    """The run's metrics on an HTTP port (the trainer pod's, scraped by the chart's PodMonitor).

    A collector rather than Gauges: a value not known yet (no evaluation so far, no GPU) is
    absent from the scrape instead of a misleading 0.
    """

    def __init__(self, port: int, labels: dict[str, str]) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self.labels = labels
        self.values: dict[str, float] = {}
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.server, self.thread = start_http_server(port, addr="0.0.0.0", registry=self.registry)
        log.info("Prometheus metrics on port %d", port)

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        values = dict(self.values)  # a step may land mid-scrape
        for name, (doc, _) in TRAINER_METRICS.items():
            if name in values:
                family = GaugeMetricFamily(name, doc, labels=list(self.labels))
                family.add_metric(list(self.labels.values()), values[name])
                yield family

    def progress(self, progress: Progress, event: str | None) -> None:
        record = {**progress.to_dict(), "ratio": progress.step / max(progress.total_steps, 1), "timestamp": time.time()}
        self.values = {
            name: float(record[attribute])
            for name, (_, attribute) in TRAINER_METRICS.items()
            if record.get(attribute) is not None
        }

    def close(self) -> None:
        self.server.shutdown()


# --------------------------------------------------------------------------- Kubernetes


def status_patcher(namespace: str, name: str) -> Callable[[dict[str, Any]], None]:
    """Merge-patch this run's status subresource: the pod's service account (or KUBECONFIG, outside a pod)."""
    import kubernetes

    config = kubernetes.client.Configuration()
    if path := os.environ.get("KUBECONFIG"):
        kubernetes.config.load_kube_config(config_file=path, client_configuration=config)
    else:
        kubernetes.config.load_incluster_config(client_configuration=config)
    config.retries = 0  # the sink has its own backoff; urllib3's retries would hold the thread
    api = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(config))

    def patch(status: dict[str, Any]) -> None:
        api.patch_namespaced_custom_object_status(
            contract.API_GROUP,
            contract.API_VERSION,
            namespace,
            contract.API_PLURAL,
            name,
            body={"status": status},
            _content_type="application/merge-patch+json",
            _request_timeout=10,
        )

    return patch


class KubernetesStatusSink(Sink):
    """Writes status.progress (at most every `interval` seconds, at once for events), status.checkpoint,
    status.preflight and status.evaluation of the run, from a thread of its own.

    Only the latest value of each field waits to be sent: when the API is down, training goes on and
    the status catches up, in one patch, when it is back.
    """

    def __init__(
        self, connect: Callable[[], Callable[[dict[str, Any]], None]], interval: float, max_backoff: float = 30.0
    ) -> None:
        self.connect = connect
        self.interval = interval
        self.max_backoff = max_backoff
        self.sent = 0  # patches that went through
        self._pending: dict[str, Any] = {}
        self._urgent = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-sink", daemon=True)
        self._thread.start()

    def _stage(self, fields: dict[str, Any], urgent: bool) -> None:
        with self._lock:
            self._pending.update(finite_or_none(fields))
            self._urgent |= urgent
        if urgent:
            self._wake.set()

    def progress(self, progress: Progress, event: str | None) -> None:
        self._stage({"progress": camel(progress.to_dict())}, urgent=event in ("begin", "eval", "end"))

    def checkpoint(self, info: dict[str, Any]) -> None:
        self._stage({"checkpoint": info}, urgent=True)

    def preflight(self, report: dict[str, Any]) -> None:
        self._stage({"preflight": report}, urgent=True)

    def evaluation(self, results: dict[str, Any]) -> None:
        self._stage({"evaluation": results}, urgent=True)

    def _take(self) -> dict[str, Any]:
        with self._lock:
            taken, self._pending, self._urgent = self._pending, {}, False
        return taken

    def _give_back(self, taken: dict[str, Any]) -> None:
        with self._lock:  # newer values staged meanwhile win
            self._pending = {**taken, **self._pending}

    def _run(self) -> None:
        patch: Callable[[dict[str, Any]], None] | None = None
        first_backoff = min(1.0, self.max_backoff)
        backoff, failing_since, last_sent = first_backoff, None, 0.0
        while True:
            stopping = self._stop.is_set()
            if not stopping:
                with self._lock:
                    urgent = self._urgent
                # Never an untimed wait: plain steps do not wake this thread, the interval does.
                self._wake.wait(0 if urgent else max(0.05, self.interval - (time.monotonic() - last_sent)))
                self._wake.clear()
            with self._lock:
                pending, urgent = bool(self._pending), self._urgent
            if not pending:
                if stopping:
                    return
                continue
            if not (urgent or stopping or time.monotonic() - last_sent >= self.interval):
                continue
            taken = self._take()
            try:
                patch = patch or self.connect()
                patch(taken)
            except Exception as exc:  # the API is down, slow or refusing: keep training, retry later
                self._give_back(taken)
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("Cannot update the TrainingRun's status (%s); retrying with backoff", exc)
                if stopping:
                    log.warning("The TrainingRun's status misses the run's last updates: %s", exc)
                    return  # one last try when closing; a dead API must not hold up the end of the run
                self._stop.wait(backoff)  # closing cuts the wait short for that last try
                backoff = min(backoff * 2, self.max_backoff)
                continue
            if failing_since is not None:
                log.info("TrainingRun status updated again after %.0fs", time.monotonic() - failing_since)
            self.sent += 1
            backoff, failing_since, last_sent = first_backoff, None, time.monotonic()

    def close(self, timeout: float = 10.0) -> None:
        """Send what is pending (briefly: a dead API must not hold up the end of the run), then stop."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)


def default_sinks(cfg: TrainConfig, *, interactive: bool | None = None) -> list[Sink]:
    """The terminal and progress.jsonl always; Prometheus when a port is set; the TrainingRun's status when
    running in one (the operator sets the run's name and namespace in the pod's environment)."""
    sinks: list[Sink] = [TerminalSink(interactive), FileSink(Path(cfg.output.dir) / "progress.jsonl")]
    name, namespace = os.environ.get(contract.RUN_NAME_ENV), os.environ.get(contract.RUN_NAMESPACE_ENV)
    if cfg.reporting.metrics_port:
        labels = {"run": name or "local", "namespace": namespace or ""}
        try:
            sinks.append(PrometheusSink(cfg.reporting.metrics_port, labels))
        except OSError as exc:
            log.warning("No Prometheus metrics: port %d: %s", cfg.reporting.metrics_port, exc.strerror)
    if name and namespace:
        sinks.append(
            KubernetesStatusSink(lambda: status_patcher(namespace, name), cfg.reporting.status_interval_seconds)
        )
    return sinks
