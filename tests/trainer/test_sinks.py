"""Reporting: every sink fed from one progress record, and none of them able to slow or stop training."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import math
import os
import pty
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from kubetune_trainer import contract
from kubetune_trainer.errors import DivergedError
from kubetune_trainer.report import ProgressTracker
from kubetune_trainer.sinks import (
    HEARTBEAT,
    TRAINER_METRICS,
    FileSink,
    KubernetesStatusSink,
    Progress,
    PrometheusSink,
    Reporter,
    Sink,
    TerminalSink,
    after_failure,
    default_sinks,
    status_patcher,
)
from kubetune_trainer.train import run
from tests.operator.conftest import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]

PROGRESS_FIELDS = {
    "step",
    "totalSteps",
    "epoch",
    "percent",
    "etaSeconds",
    "eta",
    "trainLoss",
    "evalLoss",
    "learningRate",
    "gradNorm",
    "tokensPerSecond",
    "samplesPerSecond",
    "tokensSeen",
    "samplesSeen",
    "gpuMemoryPeakBytes",
    "nonFiniteSteps",
    "lastUpdateTime",
}


class Recorder(Sink):
    """A sink that keeps what it is given (the seam between the trainer and where reports go), and its close()."""

    def __init__(self) -> None:
        self.records: list[tuple[str, Any]] = []
        self.closed = False

    def progress(self, progress: Progress, event: str | None) -> None:
        self.records.append(("progress", (progress, event)))

    def checkpoint(self, info: dict[str, Any]) -> None:
        self.records.append(("checkpoint", info))

    def preflight(self, report: dict[str, Any]) -> None:
        self.records.append(("preflight", report))

    def evaluation(self, results: dict[str, Any]) -> None:
        self.records.append(("evaluation", results))

    def close(self) -> None:
        self.closed = True

    def of(self, kind: str) -> list[Any]:
        return [r for k, r in self.records if k == kind]


def progress(step: int, loss: float | None = 2.0, total: int = 10) -> Progress:
    return Progress(
        step=step,
        total_steps=total,
        epoch=step / total,
        percent=100 * step / total,
        eta_seconds=float(total - step),
        eta=f"{total - step}s",
        train_loss=loss,
        eval_loss=None,
        learning_rate=1e-3,
        grad_norm=0.5,
        tokens_per_second=1000.0,
        samples_per_second=10.0,
        tokens_seen=step * 800,
        samples_seen=step * 8,
        gpu_memory_peak_bytes=None,
        non_finite_steps=0,
        last_update_time="2026-11-22T10:00:00Z",
    )


def test_a_run_feeds_every_record_to_the_sinks_and_progress_jsonl(make_config):
    cfg = make_config(**{"training.maxSteps": 6, "training.loggingSteps": 2, "evaluation.evalSteps": 3})
    recorder = Recorder()
    jsonl = Path(cfg.output.dir) / "progress.jsonl"
    run(cfg, sinks=[recorder, FileSink(jsonl)])

    steps = [p.step for p, event in recorder.of("progress") if event is None]
    assert steps == [1, 2, 3, 4, 5, 6]
    # Heartbeats come every few seconds of an evaluation: how many depends on the machine's speed.
    events = [e for _, e in recorder.of("progress") if e and e != HEARTBEAT]
    stepped = [(p.step, e) for p, e in recorder.of("progress") if e and e != HEARTBEAT]
    # The first step is logged too, to show the starting loss at once.
    assert stepped == [
        (0, "begin"),
        (0, "eval"),
        (1, "log"),
        (2, "log"),
        (3, "eval"),
        (4, "log"),
        (6, "log"),
        (6, "eval"),
        (6, "end"),
    ]
    last = recorder.of("progress")[-1][0]
    assert last.step == 6 and last.percent == 100.0 and last.eta == "0s"
    assert math.isfinite(last.train_loss) and math.isfinite(last.eval_loss) and last.tokens_per_second > 0
    assert last.samples_seen == 6 * cfg.training.batch_size and last.tokens_seen > 0
    seen = [p.tokens_seen for p, event in recorder.of("progress") if event is None]
    assert seen == sorted(seen) and seen[0] < seen[-1]

    (preflight,) = recorder.of("preflight")
    assert preflight["passed"] and {"config.steps", "dataset.lengths"} <= {c["name"] for c in preflight["checks"]}
    checkpoints = recorder.of("checkpoint")
    assert [c["latest"]["step"] for c in checkpoints][-1] == 6
    assert checkpoints[-1]["best"]["evalLoss"] == pytest.approx(min(c["latest"]["evalLoss"] for c in checkpoints))
    (evaluation,) = recorder.of("evaluation")
    # The losses, and whatever the evaluation against the base model adds (train.finish).
    assert {"evalLoss", "testLoss", "bestEvalLoss", "bestStep", "restoredBest", "earlyStopped"} <= set(evaluation)

    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [line["event"] for line in lines] == events  # one line per event, none per plain step
    assert set(lines[-1]) == PROGRESS_FIELDS | {"event"}
    assert lines[-1]["step"] == 6


def test_a_failing_sink_is_skipped_and_complains_once(caplog):
    class Broken(Sink):
        def progress(self, progress: Progress, event: str | None) -> None:
            raise ConnectionError("nobody listens")

    recorder = Recorder()
    reporter = Reporter([Broken(), recorder])
    for step in range(5):
        reporter.progress(progress(step), None)
    assert len(recorder.of("progress")) == 5
    assert len([r for r in caplog.records if "Broken failed" in r.message]) == 1


def test_the_terminal_line_says_step_loss_throughput_and_eta():
    line = TerminalSink(interactive=False).line(progress(3, loss=float("nan")), "log")
    assert line == "step 3/10 (30%) epoch 0.30 loss nan lr 1.00e-03 tok/s 1,000 eta 7s"


# --------------------------------------------------------------------------- terminal

# Runs in a child process whose stderr is each given pseudo-terminal in turn: what a user sees.
TERMINAL_CHILD = r"""
import json, logging, os, sys
from kubetune_trainer.sinks import Progress, TerminalSink

records = [Progress(**r) for r in json.loads(sys.argv[1])]
for fd in map(int, sys.argv[2:]):
    stream = os.fdopen(fd, "w", buffering=1)
    sys.stderr = stream
    logging.basicConfig(force=True, level=logging.INFO, stream=stream, format="%(levelname)s %(message)s")
    sink = TerminalSink()
    for record in records:
        sink.progress(record, "log" if record.step % 2 == 0 else None)
        if record.step == 5:
            logging.getLogger("kubetune_trainer.train").info("Saved checkpoint-5 (step 5)")
    sink.close()
    logging.getLogger("kubetune_trainer.train").info("after the bar")
    stream.close()
"""


def on_terminals(*columns: int) -> list[str]:
    """What TerminalSink writes on pseudo-terminals of these widths (0: one that reports no size)."""
    masters, slaves = [], []
    for width in columns:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, width, 0, 0))
        masters.append(master)
        slaves.append(slave)
    records = json.dumps([progress(step).to_dict() for step in range(1, 11)])
    child = subprocess.Popen(
        [sys.executable, "-c", TERMINAL_CHILD, records, *map(str, slaves)],
        pass_fds=slaves,
        cwd=REPO,
        stderr=subprocess.PIPE,
    )
    for slave in slaves:
        os.close(slave)
    out = {m: b"" for m in masters}
    open_ = set(masters)
    deadline = time.monotonic() + 120
    while open_ and time.monotonic() < deadline:
        for master in select.select(list(open_), [], [], 1)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                chunk = b""
            if chunk:
                out[master] += chunk
            else:
                open_.discard(master)
                os.close(master)
    _, errors = child.communicate(timeout=60)
    assert child.returncode == 0, errors.decode()
    return [out[m].decode() for m in masters]


def test_terminal_bar_on_a_terminal_keeps_log_lines_whole_and_falls_back_to_lines_without_a_width():
    with_width, no_width = on_terminals(80, 0)

    frames = {int(n) for n in re.findall(r"\| *(\d+)/10 \[", with_width)}
    assert {1, 5, 10} <= frames, with_width  # the bar is redrawn as steps go
    lines = re.split(r"[\r\n]+", with_width)
    # A record logged while the bar is up gets a line of its own, not the tail of the bar's line.
    assert "INFO Saved checkpoint-5 (step 5)" in lines, with_width
    assert "INFO after the bar" in lines
    assert "INFO step 2/10" not in with_width  # the bar says it

    # A terminal with no width (e.g. a container started with -t): plain lines, no bar.
    assert "|" not in no_width, no_width
    lines = re.split(r"[\r\n]+", no_width)
    assert [line for line in lines if line.startswith("INFO step ")] == [
        "INFO " + TerminalSink.line(progress(step), "log") for step in (2, 4, 6, 8, 10)
    ]
    assert "INFO Saved checkpoint-5 (step 5)" in lines


# --------------------------------------------------------------------------- Prometheus


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(kubetune_\w+) (\S+)$", text, re.MULTILINE)}


def test_prometheus_sink_serves_counters_and_gauges_without_run_labels_and_a_nan_loss_as_nan():
    port = free_port()
    sink = PrometheusSink(port)
    try:
        sink.progress(progress(4, loss=1.5), None)
        values = scrape(port)
        # The PodMonitor labels the series with the pod's namespace and run; the trainer claims neither.
        assert set(values) == set(TRAINER_METRICS) - {
            "kubetune_trainer_gpu_memory_peak_bytes",
            "kubetune_trainer_eval_loss",
        }
        assert values["kubetune_trainer_step"] == 4
        assert values["kubetune_trainer_progress_ratio"] == pytest.approx(0.4)
        assert values["kubetune_trainer_train_loss"] == 1.5
        assert values["kubetune_trainer_tokens_total"] == 3200
        assert values["kubetune_trainer_samples_total"] == 32
        assert values["kubetune_trainer_non_finite_steps_total"] == 0
        assert abs(values["kubetune_trainer_last_progress_timestamp_seconds"] - time.time()) < 60
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "# TYPE kubetune_trainer_tokens_total counter" in text
        assert "# TYPE kubetune_trainer_step gauge" in text

        sink.progress(progress(5, loss=float("nan")), None)  # the terminal and the file show it as NaN too
        assert math.isnan(scrape(port)["kubetune_trainer_train_loss"])
    finally:
        sink.close()


# --------------------------------------------------------------------------- progress records


def test_a_step_skipped_for_a_non_finite_loss_is_an_event_with_the_count():
    recorder = Recorder()
    skipped = [0]
    tracker = ProgressTracker(Reporter([recorder]), samples_per_step=8, non_finite_steps=lambda: skipped[0])
    args, control = TrainingArguments(output_dir="/tmp/unused", report_to="none"), TrainerControl()
    state = TrainerState(max_steps=10)
    tracker.on_train_begin(args, state, control)
    for step, bad in [(1, False), (2, True), (3, True), (4, False)]:
        state.global_step = step
        skipped[0] += bad
        tracker.on_step_end(args, state, control)
    assert [(p.step, e, p.non_finite_steps) for p, e in recorder.of("progress")] == [
        (0, "begin", 0),
        (1, None, 0),
        (2, "nonfinite", 1),
        (3, "nonfinite", 2),
        (4, None, 2),
    ]
    # Without a counter the field is None: unknown, not "none skipped".
    untracked = Recorder()
    ProgressTracker(Reporter([untracked]), samples_per_step=8).on_train_begin(args, TrainerState(max_steps=1), control)
    assert untracked.of("progress")[0][0].non_finite_steps is None


@pytest.mark.parametrize(("interval", "expected"), [(3600.0, 0), (0.0, 50)])
def test_evaluation_batches_send_heartbeats_at_most_once_an_interval(interval, expected):
    recorder = Recorder()
    tracker = ProgressTracker(Reporter([recorder]), samples_per_step=8, heartbeat_seconds=interval)
    args, control = TrainingArguments(output_dir="/tmp/unused", report_to="none"), TrainerControl()
    state = TrainerState(max_steps=10, global_step=4)
    tracker.on_step_end(args, state, control)
    for _ in range(50):  # an evaluation's batches
        tracker.on_prediction_step(args, state, control)
    events = [e for _, e in recorder.of("progress")]
    assert events == [None] + [HEARTBEAT] * expected
    assert all(p.step == 4 for p, _ in recorder.of("progress"))


def test_a_diverging_run_reports_its_skipped_steps_before_it_stops(make_config):
    cfg = make_config(**{"training.learningRate": 1e30, "training.maxSteps": 20, "evaluation.evalSteps": 100})
    recorder = Recorder()
    jsonl = Path(cfg.output.dir) / "progress.jsonl"
    with pytest.raises(DivergedError):
        run(cfg, sinks=[recorder, FileSink(jsonl)])
    records = recorder.of("progress")
    last, event = records[-1]
    assert event == "end", "the end of a diverged run is a record too: the status sink sends it at once"
    assert last.non_finite_steps == cfg.training.max_non_finite_steps
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [line["nonFiniteSteps"] for line in lines if line["event"] == "nonfinite"] == [1, 2, 3]
    assert lines[-1]["event"] == "end" and lines[-1]["nonFiniteSteps"] == 3


# --------------------------------------------------------------------------- Kubernetes


class ApiError(Exception):
    """What kubernetes.client raises for an HTTP error: the status code is what the sink looks at."""

    def __init__(self, status: int, message: str = "refused") -> None:
        super().__init__(message)
        self.status = status
        self.body = json.dumps({"message": message})


class FakeApi:
    """Stands in for the API server at the patch seam: records patches, can fail, refuse or hang."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.times: list[float] = []  # when each patch went through
        self.down = False
        self.refuse: dict[str, int] = {}  # field -> HTTP status for any patch that holds it
        self.status: int | None = None  # answer every patch with this HTTP status
        self.hang = threading.Event()  # set: calls block until released
        self.release = threading.Event()
        self.in_call = threading.Event()
        self.failures = 0
        self.attempts: list[dict[str, Any]] = []

    def patch(self, status: dict[str, Any]) -> None:
        self.attempts.append(status)
        if self.hang.is_set():
            self.in_call.set()  # until the call returns
            self.release.wait(30)
            self.in_call.clear()
        if self.down:
            self.failures += 1
            raise ConnectionRefusedError("API server down")
        if self.status is not None:
            self.failures += 1
            raise ApiError(self.status)
        for field, code in self.refuse.items():
            if field in status:
                raise ApiError(code, f"TrainingRun.kubetune.io is invalid: status.{field}: Invalid value")
        self.patches.append(json.loads(json.dumps(status)))
        self.times.append(time.monotonic())

    def merged(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for p in self.patches:
            merged.update(p)
        return merged


@pytest.mark.parametrize(
    ("status", "fields", "action"),
    [
        (422, 2, "split"),
        (422, 1, "drop"),
        (400, 1, "drop"),
        (404, 3, "drop"),
        (403, 1, "retry"),
        (409, 1, "retry"),
        (429, 1, "retry"),
        (500, 2, "retry"),
        (503, 1, "retry"),
        (None, 1, "retry"),  # no answer at all
    ],
)
def test_what_a_failed_patch_means(status, fields, action):
    assert after_failure(status, fields) == action


def test_status_sink_spaces_plain_steps_by_the_interval():
    api = FakeApi()
    interval = 0.3
    sink = KubernetesStatusSink(lambda: api.patch, interval=interval)
    steps = 0
    try:
        deadline = time.monotonic() + 60
        while len(api.times) < 4:
            assert time.monotonic() < deadline, "timed out"
            steps += 1
            sink.progress(progress(steps, total=10**6), None)
            time.sleep(0.001)
        times = list(api.times)
    finally:
        sink.close()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= interval * 0.95, gaps  # never sooner than the interval, however busy the machine
    assert steps > 2 * len(times)  # a patch per interval, not per step
    assert api.merged()["progress"]["step"] == steps  # close sent the latest


def test_status_sink_sends_events_at_once_and_the_first_non_finite_step():
    api = FakeApi()
    sink = KubernetesStatusSink(lambda: api.patch, interval=3600)  # no plain patch after the first one
    try:
        sink.progress(progress(1), None)
        wait_for(lambda: len(api.patches) == 1, 30, "the first patch")
        for step in range(2, 50):
            sink.progress(progress(step), None)
        sink.checkpoint({"latest": {"step": 49}, "best": None})
        wait_for(lambda: len(api.patches) == 2, 30, "the checkpoint, long before the interval")
        assert api.patches[1] == {
            "checkpoint": {"latest": {"step": 49}, "best": None},
            "progress": api.patches[1]["progress"],
        }
        assert api.patches[1]["progress"]["step"] == 49  # and the latest progress with it

        sink.progress(progress(50), "nonfinite")
        wait_for(lambda: len(api.patches) == 3, 30, "the run's first non-finite step")
        sink.progress(progress(51), "nonfinite")  # later ones wait for the interval (or the end)
        sink.progress(progress(52), "end")
        wait_for(lambda: len(api.patches) == 4, 30, "the end")
        assert [p["progress"]["step"] for p in api.patches[2:]] == [50, 52]
    finally:
        sink.close()


def test_status_sink_sleeps_while_there_is_nothing_to_send():
    api = FakeApi()
    sink = KubernetesStatusSink(lambda: api.patch, interval=0.01)
    try:
        sink.progress(progress(1), "begin")
        wait_for(lambda: api.patches, 30, "the first patch")
        woken = sink._wakeups
        # Nothing staged: the thread waits for a record, not for a timer (it used to wake every 50 ms).
        time.sleep(0.5)
        assert sink._wakeups - woken <= 1
        sink.progress(progress(2), None)
        wait_for(lambda: len(api.patches) == 2, 30, "a plain step after idling")
    finally:
        sink.close()


def test_status_sink_never_blocks_training_and_catches_up_when_the_api_returns():
    api = FakeApi()
    api.down = True
    sink = KubernetesStatusSink(lambda: api.patch, interval=0.05, max_backoff=0.2)
    try:
        for step in range(1, 301):
            sink.progress(progress(step, total=300), "eval" if step % 50 == 0 else None)
        wait_for(lambda: api.failures >= 2, 30, "the sink to keep trying")
        assert not api.patches

        api.down = False  # back: the latest state arrives, in one patch, not a replay
        wait_for(lambda: api.patches, 30, "the catch-up")
        assert api.patches[0]["progress"]["step"] == 300
        assert len(api.patches) == 1

        # A hanging API: the sink's thread is stuck in the call, and reports still return.
        api.hang.set()
        sink.evaluation({"evalLoss": 1.0})
        wait_for(api.in_call.is_set, 30, "the patch to hang")
        for step in range(301, 401):
            sink.progress(progress(step, total=400), None)
        assert api.in_call.is_set(), "staging returned while the patch still hangs"
        api.hang.clear()
        api.release.set()
    finally:
        sink.close()
    assert api.merged()["progress"]["step"] == 400
    assert api.merged()["evaluation"] == {"evalLoss": 1.0}


def test_a_refused_field_is_dropped_and_the_others_go_on(caplog):
    api = FakeApi()
    api.refuse = {"evaluation": 422}
    sink = KubernetesStatusSink(lambda: api.patch, interval=3600)  # only events are sent after the first
    try:
        sink.progress(progress(1), "begin")
        wait_for(lambda: api.patches, 30, "the first patch")
        sink.progress(progress(2), None)  # waits for the interval...
        sink.evaluation({"evalLoss": "not a number"})  # ...and goes with this, in one patch
        wait_for(lambda: api.merged().get("progress", {}).get("step") == 2, 30, "step 2 despite the refusal")
        for step in range(3, 6):
            sink.progress(progress(step), "eval")
            wait_for(lambda s=step: api.merged()["progress"]["step"] == s, 30, f"step {step}")
    finally:
        sink.close()
    refused = [a for a in api.attempts if "evaluation" in a]
    assert len(refused) == 2, refused  # with the progress, then alone; never again
    assert "evaluation" not in api.merged()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "status.evaluation (HTTP 422: TrainingRun.kubetune.io is invalid" in errors[0].message


def test_a_deleted_run_drops_its_updates(caplog):
    api = FakeApi()
    api.status = 404
    sink = KubernetesStatusSink(lambda: api.patch, interval=0.05, max_backoff=30)
    sink.progress(progress(1), "begin")
    wait_for(lambda: api.attempts, 30, "the first try")
    sink.progress(progress(2), "end")
    wait_for(lambda: len(api.attempts) == 2, 30, "the second try: not held back by a 30 s backoff")
    sink.close()
    assert len(api.attempts) == 2  # nothing was put back to retry
    assert len([r for r in caplog.records if "HTTP 404" in r.message]) == 1


def test_forbidden_is_retried_with_backoff_and_said_once(caplog):
    api = FakeApi()
    api.status = 403
    sink = KubernetesStatusSink(lambda: api.patch, interval=0.05, max_backoff=0.1)
    try:
        sink.checkpoint({"latest": {"step": 3}, "best": None})
        wait_for(lambda: api.failures >= 4, 30, "several tries")
        api.status = None  # RBAC fixed
        wait_for(lambda: api.patches, 30, "the checkpoint after the fix")
    finally:
        sink.close()
    assert api.merged()["checkpoint"] == {"latest": {"step": 3}, "best": None}
    said = [r for r in caplog.records if "HTTP 403" in r.message]
    assert len(said) == 1 and "trainingruns/status" in said[0].message


def test_status_sink_close_is_bounded_when_the_api_is_gone_or_hangs():
    api = FakeApi()
    api.down = True
    sink = KubernetesStatusSink(lambda: api.patch, interval=0.05, max_backoff=30)
    sink.progress(progress(1), "begin")
    wait_for(lambda: api.failures >= 1, 30, "a first failure")
    t = time.monotonic()
    sink.close()
    assert time.monotonic() - t < 10  # not the 30 s backoff
    assert api.failures >= 2  # a last try on close

    api = FakeApi()
    api.hang.set()
    sink = KubernetesStatusSink(lambda: api.patch, interval=0.05, close_timeout=0.5)
    sink.progress(progress(1), "begin")
    wait_for(api.in_call.is_set, 30, "the patch to hang")
    t = time.monotonic()
    sink.close()  # within SIGTERM's grace period, whatever the API does
    assert time.monotonic() - t < 10
    api.release.set()


def test_status_sink_writes_nulls_for_non_finite_numbers():
    api = FakeApi()
    sink = KubernetesStatusSink(lambda: api.patch, interval=0.05)
    sink.progress(progress(2, loss=float("inf")), "log")
    sink.close()
    assert api.merged()["progress"]["trainLoss"] is None


def test_default_sinks_follow_the_config_and_the_pod_environment(make_config, monkeypatch, tmp_path):
    cfg = make_config()
    monkeypatch.delenv(contract.RUN_NAME_ENV, raising=False)
    assert [type(s).__name__ for s in default_sinks(cfg, interactive=False)] == ["TerminalSink", "FileSink"]

    monkeypatch.setenv(contract.RUN_NAME_ENV, "r1")
    monkeypatch.setenv(contract.RUN_NAMESPACE_ENV, "ml")
    port = free_port()
    sinks = default_sinks(make_config(**{"reporting.metricsPort": port}), interactive=False)
    try:
        assert [type(s).__name__ for s in sinks] == [
            "TerminalSink",
            "FileSink",
            "PrometheusSink",
            "KubernetesStatusSink",
        ]
        Reporter(sinks[2:3]).progress(progress(1), "begin")
        assert (
            "\nkubetune_trainer_step 1.0\n"
            in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        )
    finally:
        Reporter(sinks).close()


def test_a_taken_metrics_port_does_not_stop_the_run(make_config, caplog):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sinks = default_sinks(make_config(**{"reporting.metricsPort": port}), interactive=False)
    assert [type(s).__name__ for s in sinks] == ["TerminalSink", "FileSink"]
    assert f"port {port}" in caplog.text


class Outage:
    """A TCP forwarder in front of the API server that can stop listening: while stopped, connections are
    refused and open ones are cut, as when the API server's process is gone."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self.target = (host, int(port))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        for sock in [s for s in (listener, *self._sockets) if s is not None]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def api_server(tmp_path, monkeypatch):
    """The API emulator with one TrainingRun, behind an Outage that KUBECONFIG points at: (status of the
    run, the outage)."""
    from tests.operator.emulator import ApiServer

    server = ApiServer().start()
    res = server.resource(contract.API_GROUP, contract.API_PLURAL)
    body = {"apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}", "kind": "TrainingRun"}
    server.call(lambda: server.create(res, "ml", {**body, "metadata": {"name": "r1", "namespace": "ml"}}))
    outage = Outage(server.url)
    server.url = outage.url  # what kubeconfig() writes
    monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig")))

    def status() -> dict[str, Any]:
        return server.call(lambda: server.get(res, "ml", "r1")).get("status") or {}

    yield status, outage
    outage.down()
    server.stop()


def test_a_field_staged_during_an_outage_arrives_when_the_api_is_back(api_server):
    status_of, outage = api_server
    sink = KubernetesStatusSink(lambda: status_patcher("ml", "r1"), interval=0.2, max_backoff=0.5)
    try:
        sink.progress(progress(1), "begin")
        wait_for(lambda: status_of().get("progress"), 30, "the first patch")
        outage.down()
        sink.checkpoint({"latest": {"step": 4}, "best": {"step": 3}})  # staged once, never again
        sink.progress(progress(5), None)
        wait_for(lambda: sink.failures >= 2, 30, "refused connections")
        assert "checkpoint" not in status_of()
        outage.up()
        wait_for(lambda: status_of().get("checkpoint"), 30, "the checkpoint after the outage")
        status = status_of()
        assert status["checkpoint"] == {"latest": {"step": 4}, "best": {"step": 3}}
        assert status["progress"]["step"] == 5
    finally:
        sink.close()


def test_status_reaches_the_api_server_through_an_outage(api_server, make_config):
    """A real run and the real client: the API server is unreachable from step 2 to step 5."""
    status_of, outage = api_server
    status_sink = KubernetesStatusSink(lambda: status_patcher("ml", "r1"), interval=0.2, max_backoff=0.5)
    refused: list[int] = []

    class Outages(Sink):
        def progress(self, p: Progress, event: str | None) -> None:
            if event is None and p.step == 2:
                outage.down()
            if event is None and p.step == 5:
                refused.append(status_sink.failures)
                outage.up()

    cfg = make_config(**{"training.maxSteps": 8, "evaluation.evalSteps": 4})
    result = run(cfg, sinks=[Outages(), status_sink])
    assert result.metrics["global_step"] == 8
    status = status_of()
    assert status["progress"]["step"] == 8 and status["progress"]["percent"] == 100.0
    assert status["checkpoint"]["latest"]["step"] == 8
    assert status["evaluation"]["evalLoss"] == pytest.approx(result.metrics["eval_loss"])
    assert status["preflight"]["checks"]
    assert refused and refused[0] >= 1, "the sink kept trying during the outage"


def test_an_api_error_without_text_is_named_by_its_type():
    from kubetune_trainer.sinks import _reason

    assert _reason(ConnectionResetError()) == "ConnectionResetError"  # it raised IndexError in the status thread
    assert _reason(ApiError(422, "status.progress: Invalid value")) == "status.progress: Invalid value"
