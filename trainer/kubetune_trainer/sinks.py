"""Where progress goes: the terminal, output/progress.jsonl, Prometheus, the TrainingRun's status.

Every sink gets the same records from a `Reporter`: the `Progress` of each step and event,
the checkpoint just saved, the preflight report, the final evaluation. A sink decides how
often to act. A sink that fails is logged and skipped; none may slow or stop training, so
the Kubernetes sink talks to the API from its own thread and only ever keeps the latest
state to send.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic.alias_generators import to_camel

from kubetune_trainer import contract
from kubetune_trainer.config import TrainConfig
from kubetune_trainer.contract import PROGRESS_FILE
from kubetune_trainer.errors import first_line

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """One record for every sink. Rates are over the last few steps; `*_seen` count from the run's start
    (a resumed run carries on from its checkpoint)."""

    step: int
    total_steps: int
    epoch: float
    percent: float
    eta_seconds: float | None
    eta: str
    train_loss: float | None
    eval_loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    tokens_per_second: float | None
    samples_per_second: float | None
    tokens_seen: int  # non-padding tokens trained on
    samples_seen: int  # optimizer steps x samples per step
    gpu_memory_peak_bytes: int | None
    # Optimizer steps skipped for a non-finite loss or gradients in this process (None: nobody counts them).
    # An integer, unlike a NaN loss, survives JSON and the status, so the operator can alert on it.
    non_finite_steps: int | None
    last_update_time: str

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))  # every field is a scalar: no need for asdict's deep copy, at every step


def finite_or_none(value: Any) -> Any:
    """JSON (and a Kubernetes status) has no NaN or Infinity: null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


_to_camel = functools.lru_cache(maxsize=1024)(to_camel)  # the same few keys, at every step


def camel(record: dict[str, Any]) -> dict[str, Any]:
    return {_to_camel(k): v for k, v in record.items()}


def as_status(value: Any) -> Any:
    """A record as the status holds it: camelCase keys, null for what JSON cannot hold."""
    return finite_or_none(camel(value.to_dict()) if isinstance(value, Progress) else value)


def format_duration(seconds: float | None) -> str:
    """Short human duration: '45s', '3m20s', '2h05m', '3d04h'; '-' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# A record made while no step is (evaluations): the run is alive, nothing else is new.
HEARTBEAT = "heartbeat"


class Sink:
    """The interface; each method may be left as it is (nothing to do for that record)."""

    def progress(self, progress: Progress, event: str | None) -> None:
        """event: None for a plain step, else 'begin', 'log', 'eval', 'nonfinite' (a step skipped for a
        non-finite loss), 'end', or HEARTBEAT (every few seconds of an evaluation)."""

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


def bar_fits(stream: Any) -> bool:
    """A bar needs a terminal that knows its width: some report 0 columns (a container started with -t
    and no size), where a bar garbles the log and plain lines read better."""
    try:
        return bool(stream.isatty()) and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):  # not a file, closed, or no terminal behind it
        return False


class TerminalSink(Sink):
    """A tqdm bar on a terminal, with log records written above it rather than into it; one plain log
    line per logging interval otherwise."""

    def __init__(self, interactive: bool | None = None) -> None:
        self.interactive = bar_fits(sys.stderr) if interactive is None else interactive
        self._bar: Any = None
        self._redirect = contextlib.ExitStack()

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
        if self._bar is None:
            from tqdm.contrib.logging import logging_redirect_tqdm
            from tqdm.std import tqdm

            self._bar = tqdm(total=p.total_steps, initial=p.step, unit="step", dynamic_ncols=True, file=sys.stderr)
            # While the bar is up, the console handlers write through tqdm, which clears the bar, writes the
            # record on a line of its own and draws the bar again below it.
            self._redirect.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        self._bar.n = p.step
        self._bar.set_postfix_str(
            f"loss {_fmt(p.train_loss, '.4f')} eval {_fmt(p.eval_loss, '.4f')} "
            f"tok/s {_fmt(p.tokens_per_second, ',.0f')} eta {p.eta}",
            refresh=True,
        )
        if event == "eval":
            self._bar.write(self.line(p, event), file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()  # the console handlers as they were


# --------------------------------------------------------------------------- file


class FileSink(Sink):
    """output/progress.jsonl: one line per logging interval and per event, to plot or tail later."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def progress(self, progress: Progress, event: str | None) -> None:
        if event in (None, HEARTBEAT):
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8", buffering=1)  # line-buffered: each line as written
        self._file.write(json.dumps(finite_or_none({"event": event, **camel(progress.to_dict())})) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --------------------------------------------------------------------------- Prometheus

# name -> (help, type, Progress attribute). The series carry no run labels: the scraper knows the pod, and
# the chart's PodMonitor takes namespace and run from it, so a pod cannot report as another namespace's run.
# Throughput is a counter (rate() it); the status and the terminal keep the trainer's own tokens/s.
TRAINER_METRICS: dict[str, tuple[str, Literal["gauge", "counter"], str]] = {
    "kubetune_trainer_step": ("Optimizer steps done.", "gauge", "step"),
    "kubetune_trainer_total_steps": ("Optimizer steps of the whole run.", "gauge", "total_steps"),
    "kubetune_trainer_epoch": ("Epochs done (fractional).", "gauge", "epoch"),
    "kubetune_trainer_progress_ratio": ("Share of the run's steps done, 0 to 1.", "gauge", "ratio"),
    "kubetune_trainer_eta_seconds": ("Estimated seconds left.", "gauge", "eta_seconds"),
    "kubetune_trainer_train_loss": ("Latest logged training loss (NaN when not finite).", "gauge", "train_loss"),
    "kubetune_trainer_eval_loss": ("Latest validation loss.", "gauge", "eval_loss"),
    "kubetune_trainer_learning_rate": ("Current learning rate.", "gauge", "learning_rate"),
    "kubetune_trainer_grad_norm": ("Latest logged gradient norm.", "gauge", "grad_norm"),
    "kubetune_trainer_tokens_total": (
        "Non-padding tokens trained on since the run started (a resumed run counts on from its checkpoint).",
        "counter",
        "tokens_seen",
    ),
    "kubetune_trainer_samples_total": ("Samples trained on since the run started.", "counter", "samples_seen"),
    "kubetune_trainer_non_finite_steps_total": (
        "Optimizer steps this trainer process skipped for a non-finite loss or gradients.",
        "counter",
        "non_finite_steps",
    ),
    "kubetune_trainer_gpu_memory_peak_bytes": (
        "Peak GPU memory allocated by the trainer process.",
        "gauge",
        "gpu_memory_peak_bytes",
    ),
    "kubetune_trainer_last_progress_timestamp_seconds": (
        "Unix time of the trainer's last progress record (one per optimizer step and per event).",
        "gauge",
        "timestamp",
    ),
}


def metric_values(progress: Progress, timestamp: float) -> dict[str, float]:
    """Pure: the samples of TRAINER_METRICS for one record; a value not known yet is left out."""
    extra = {"ratio": progress.step / max(progress.total_steps, 1), "timestamp": timestamp}
    values = {}
    for name, (_, _, attribute) in TRAINER_METRICS.items():
        value = extra[attribute] if attribute in extra else getattr(progress, attribute)
        if value is not None:
            values[name] = float(value)
    return values


class PrometheusSink(Sink):
    """The run's metrics on an HTTP port (the trainer pod's, scraped by the chart's PodMonitor).

    A collector rather than Gauges: a value not known yet (no evaluation so far, no GPU) is
    absent from the scrape instead of a misleading 0.
    """

    def __init__(self, port: int) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self._latest: tuple[Progress, float] | None = None
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.server, self.thread = start_http_server(port, addr="0.0.0.0", registry=self.registry)
        log.info("Prometheus metrics on port %d", port)

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if self._latest is None:
            return
        values = metric_values(*self._latest)
        for name, (doc, kind, _) in TRAINER_METRICS.items():
            if name in values:
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(name, doc, value=values[name])

    def progress(self, progress: Progress, event: str | None) -> None:
        # The training thread only keeps the record (replaced whole, so a scrape sees one); the scrape, on
        # the server's thread, turns it into samples.
        self._latest = (progress, time.time())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
            _request_timeout=5,
        )

    return patch


FailureAction = Literal["split", "drop", "retry"]


def after_failure(status: int | None, fields: int) -> FailureAction:
    """Pure: what a failed status patch of `fields` fields, answered with HTTP `status` (None: no answer),
    means for them.

    400/422: the API refuses the body, and would refuse it again: find the field (send each alone), then
    drop it. 404: the TrainingRun is gone: drop. Anything else may pass later (the API down or slow, 403
    until RBAC is fixed, 409, 429, 5xx): keep the fields and retry with backoff.
    """
    if status in (400, 422):
        return "split" if fields > 1 else "drop"
    if status == 404:
        return "drop"
    return "retry"


def _http_status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)  # kubernetes.client.ApiException
    return status if isinstance(status, int) and not isinstance(status, bool) else None


def _reason(exc: BaseException) -> str:
    """The API's own message (a 422 names the field and the rule) rather than the whole response."""
    body = getattr(exc, "body", None)
    if body:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            return str(json.loads(body)["message"])
    reason = str(getattr(exc, "reason", None) or "").strip()  # ApiException's HTTP reason, e.g. "Forbidden"
    return reason.splitlines()[0][:300] if reason else first_line(exc, 300)


class KubernetesStatusSink(Sink):
    """Writes status.progress (at most every `interval` seconds, at once for events), status.checkpoint,
    status.preflight and status.evaluation of the run, from a thread of its own.

    Only the latest value of each field waits to be sent: when the API is down, training goes on and
    the status catches up, in one patch, when it is back. A field the API refuses (422) is dropped,
    not retried forever with every later update behind it. `close` waits `close_timeout` seconds at
    most, so that it fits in a SIGTERM's checkpoints.graceSeconds.
    """

    def __init__(
        self,
        connect: Callable[[], Callable[[dict[str, Any]], None]],
        interval: float,
        max_backoff: float = 30.0,
        close_timeout: float = 2.5,
    ) -> None:
        self.connect = connect
        self.interval = interval
        self.max_backoff = max_backoff
        self.close_timeout = close_timeout
        self.sent = 0  # patches that went through
        self.failures = 0  # patches that did not, to be retried
        self._pending: dict[str, Any] = {}
        self._urgent = False
        self._closing = False
        self._told_non_finite = False
        self._wakeups = 0  # times the thread woke up: idle, it sleeps until something is staged
        self._complained: set[Any] = set()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="status-sink", daemon=True)
        self._thread.start()

    def _stage(self, fields: dict[str, Any], urgent: bool) -> None:
        with self._cond:
            idle = not self._pending
            self._pending.update(fields)
            self._urgent |= urgent
            # Plain steps wake the thread only when it has nothing to send; the interval does the rest.
            if urgent or idle:
                self._cond.notify()

    def progress(self, progress: Progress, event: str | None) -> None:
        # The record itself is staged: the sink's thread turns it into JSON, not the training thread.
        # The run's first non-finite step goes out at once (the guard may end the run three steps later);
        # later ones ride the interval, so a run with sporadic NaNs cannot flood the API server.
        urgent = event in ("begin", "eval", "end") or (event == "nonfinite" and not self._told_non_finite)
        self._told_non_finite |= event == "nonfinite"
        self._stage({"progress": progress}, urgent=urgent)

    def checkpoint(self, info: dict[str, Any]) -> None:
        self._stage({"checkpoint": info}, urgent=True)

    def preflight(self, report: dict[str, Any]) -> None:
        self._stage({"preflight": report}, urgent=True)

    def evaluation(self, results: dict[str, Any]) -> None:
        self._stage({"evaluation": results}, urgent=True)

    def _give_back(self, fields: dict[str, Any], urgent: bool = False) -> None:
        with self._cond:  # newer values staged meanwhile win
            self._pending = {**fields, **self._pending}
            self._urgent |= urgent

    def _complain_once(self, key: Any, level: int, message: str, *args: Any) -> None:
        if key not in self._complained:
            self._complained.add(key)
            log.log(level, message, *args)

    def _next(self, due: Callable[[], float]) -> tuple[dict[str, Any], bool] | None:
        """Wait until something is due (or closing) and take it; None when closing with nothing left."""
        with self._cond:
            while True:
                if self._pending:
                    if self._closing:
                        break
                    wait = due() - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                elif self._closing:
                    return None
                else:
                    self._cond.wait()  # idle: no timer, the next record staged wakes us
                self._wakeups += 1
            taken, self._pending, self._urgent = self._pending, {}, False
            return taken, self._closing

    def _run(self) -> None:
        patch: Callable[[dict[str, Any]], None] | None = None
        first_backoff = min(1.0, self.max_backoff)
        backoff, failing_since, retry_at, last_sent = first_backoff, None, 0.0, -math.inf
        split = False

        def due() -> float:
            if failing_since is not None:
                return retry_at  # the backoff holds even for events; closing cuts it short
            return time.monotonic() if self._urgent else last_sent + self.interval

        while (job := self._next(due)) is not None:
            taken, closing = job
            taken = {key: as_status(value) for key, value in taken.items()}
            parts = [{key: value} for key, value in taken.items()] if split else [taken]
            split = False
            for i, part in enumerate(parts):
                try:
                    patch = patch or self.connect()
                    patch(part)
                except Exception as exc:  # the API is down, slow or refusing: keep training
                    status = _http_status(exc)
                    action = after_failure(status, len(part))
                    if action == "split":  # one of these fields is refused: send them one by one, now
                        split = True
                        self._give_back(part, urgent=True)
                        continue
                    if action == "drop":
                        self._complain_once(
                            ("drop", status, tuple(part)),
                            logging.ERROR,
                            "The API refused the TrainingRun's status.%s (HTTP %s: %s); dropped, the other "
                            "status updates go on",
                            "/".join(part),
                            status,
                            _reason(exc),
                        )
                        continue
                    self.failures += 1
                    for rest in parts[i:]:
                        self._give_back(rest)
                    if status == 403:
                        self._complain_once(
                            "forbidden",
                            logging.WARNING,
                            "Forbidden to update the TrainingRun's status (HTTP 403: %s): the trainer's "
                            "ServiceAccount needs get/patch on trainingruns/status; retrying with backoff",
                            _reason(exc),
                        )
                    elif failing_since is None:
                        log.warning("Cannot update the TrainingRun's status (%s); retrying with backoff", _reason(exc))
                    if failing_since is None:
                        failing_since = time.monotonic()
                    if closing:
                        log.warning("The TrainingRun's status misses the run's last updates: %s", _reason(exc))
                        return  # one last try when closing; a dead API must not hold up the end of the run
                    retry_at = time.monotonic() + backoff
                    backoff = min(backoff * 2, self.max_backoff)
                    break
                else:
                    if failing_since is not None:
                        log.info("TrainingRun status updated again after %.0fs", time.monotonic() - failing_since)
                    self.sent += 1
                    backoff, failing_since, last_sent = first_backoff, None, time.monotonic()

    def close(self) -> None:
        """Send what is pending, then stop; `close_timeout` at most (a hung API must not eat the grace period)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(self.close_timeout)
        if self._thread.is_alive():
            log.warning("The TrainingRun's status may miss the run's last update: the API did not answer in time")


def default_sinks(cfg: TrainConfig, *, interactive: bool | None = None) -> list[Sink]:
    """The terminal and progress.jsonl always; Prometheus when a port is set; the TrainingRun's status when
    running in one (the operator sets the run's name and namespace in the pod's environment)."""
    sinks: list[Sink] = [TerminalSink(interactive), FileSink(Path(cfg.output.dir) / PROGRESS_FILE)]
    name, namespace = os.environ.get(contract.RUN_NAME_ENV), os.environ.get(contract.RUN_NAMESPACE_ENV)
    if cfg.reporting.metrics_port:
        try:
            sinks.append(PrometheusSink(cfg.reporting.metrics_port))
        except OSError as exc:
            log.warning("No Prometheus metrics: port %d: %s", cfg.reporting.metrics_port, exc.strerror)
    if name and namespace:
        sinks.append(
            KubernetesStatusSink(lambda: status_patcher(namespace, name), cfg.reporting.status_interval_seconds)
        )
    return sinks
