"""Reporting: every sink fed from one progress record, and none of them able to slow or stop training."""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer import contract
from kubetune_trainer.report import Progress
from kubetune_trainer.sinks import (
    TRAINER_METRICS,
    FileSink,
    KubernetesStatusSink,
    PrometheusSink,
    Reporter,
    Sink,
    TerminalSink,
    default_sinks,
    status_patcher,
)
from kubetune_trainer.train import run
from tests.operator.conftest import free_port

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
    "gpuMemoryBytes",
    "lastUpdateTime",
}


class Recorder(Sink):
    def __init__(self) -> None:
        self.records: list[tuple[str, Any]] = []

    def progress(self, progress: Progress, event: str | None) -> None:
        self.records.append(("progress", (progress, event)))

    def checkpoint(self, info: dict[str, Any]) -> None:
        self.records.append(("checkpoint", info))

    def preflight(self, report: dict[str, Any]) -> None:
        self.records.append(("preflight", report))

    def evaluation(self, results: dict[str, Any]) -> None:
        self.records.append(("evaluation", results))

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
        gpu_memory_bytes=None,
        last_update_time="2026-11-22T10:00:00Z",
    )


def test_a_run_feeds_every_record_to_the_sinks_and_progress_jsonl(make_config):
    cfg = make_config(**{"training.maxSteps": 6, "training.loggingSteps": 2, "evaluation.evalSteps": 3})
    recorder = Recorder()
    jsonl = Path(cfg.output.dir) / "progress.jsonl"
    run(cfg, sinks=[recorder, FileSink(jsonl)])

    steps = [p.step for p, event in recorder.of("progress") if event is None]
    assert steps == [1, 2, 3, 4, 5, 6]
    events = [e for _, e in recorder.of("progress") if e]
    stepped = [(p.step, e) for p, e in recorder.of("progress") if e]
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

    (preflight,) = recorder.of("preflight")
    assert preflight["passed"] and {"config.steps", "dataset.lengths"} <= {c["name"] for c in preflight["checks"]}
    checkpoints = recorder.of("checkpoint")
    assert [c["latest"]["step"] for c in checkpoints][-1] == 6
    assert checkpoints[-1]["best"]["evalLoss"] == pytest.approx(min(c["latest"]["evalLoss"] for c in checkpoints))
    (evaluation,) = recorder.of("evaluation")
    assert set(evaluation) == {"evalLoss", "testLoss", "bestEvalLoss", "bestStep", "restoredBest", "earlyStopped"}

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


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        m.group(1): float(m.group(3))
        for m in re.finditer(r'^(kubetune_\w+)\{([^}]*run="r1"[^}]*)\} (\S+)$', text, re.MULTILINE)
    }


def test_prometheus_sink_serves_the_run_labelled_and_a_nan_loss_as_nan():
    port = free_port()
    sink = PrometheusSink(port, {"run": "r1", "namespace": "ml"})
    try:
        sink.progress(progress(4, loss=1.5), None)
        values = scrape(port)
        assert set(values) == set(TRAINER_METRICS) - {"kubetune_trainer_gpu_memory_bytes", "kubetune_trainer_eval_loss"}
        assert values["kubetune_trainer_step"] == 4
        assert values["kubetune_trainer_progress_ratio"] == pytest.approx(0.4)
        assert values["kubetune_trainer_train_loss"] == 1.5
        assert abs(values["kubetune_trainer_last_progress_timestamp_seconds"] - time.time()) < 5

        sink.progress(progress(5, loss=float("nan")), None)  # what the non-finite-loss alert looks for
        assert math.isnan(scrape(port)["kubetune_trainer_train_loss"])
    finally:
        sink.close()


class FakeApi:
    """Stands in for the API server at the patch seam: records patches, can fail or hang."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.down = False
        self.hang = threading.Event()  # set: calls block until released
        self.release = threading.Event()
        self.failures = 0

    def patch(self, status: dict[str, Any]) -> None:
        if self.hang.is_set():
            self.release.wait(30)
        if self.down:
            self.failures += 1
            raise ConnectionRefusedError("API server down")
        self.patches.append(json.loads(json.dumps(status)))

    def merged(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for p in self.patches:
            merged.update(p)
        return merged


def wait_until(check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_status_sink_limits_plain_steps_to_the_interval_but_sends_events_at_once():
    api = FakeApi()
    sink = KubernetesStatusSink(lambda: api.patch, interval=0.5)
    try:
        start = time.monotonic()
        while time.monotonic() - start < 1.2:
            sink.progress(progress(int((time.monotonic() - start) * 100), total=1000), None)
            time.sleep(0.001)
        assert 2 <= len(api.patches) <= 4, len(api.patches)  # ~one per 0.5 s, not one per step

        before = len(api.patches)
        sink.checkpoint({"latest": {"step": 120}, "best": None})
        wait_until(lambda: len(api.patches) > before, timeout=0.3)  # not held back by the interval
        assert api.patches[-1]["checkpoint"] == {"latest": {"step": 120}, "best": None}
    finally:
        sink.close()
    assert api.merged()["progress"]["step"] >= 119  # close sent the latest


def test_status_sink_never_blocks_training_and_catches_up_when_the_api_returns():
    api = FakeApi()
    api.down = True
    sink = KubernetesStatusSink(lambda: api.patch, interval=0.05, max_backoff=0.2)
    try:
        slowest = 0.0
        for step in range(1, 301):
            t = time.perf_counter()
            sink.progress(progress(step, total=300), "eval" if step % 50 == 0 else None)
            slowest = max(slowest, time.perf_counter() - t)
            time.sleep(0.002)
        assert api.failures >= 2 and not api.patches
        assert slowest < 0.05, f"a report took {slowest:.3f}s while the API was down"

        api.down = False  # back: the latest state arrives, in one patch, not a replay
        wait_until(lambda: api.patches)
        assert api.patches[0]["progress"]["step"] == 300
        assert len(api.patches) == 1

        api.hang.set()  # a hanging API: reports still return at once
        sink.evaluation({"evalLoss": 1.0})
        t = time.perf_counter()
        for step in range(301, 401):
            sink.progress(progress(step, total=400), None)
        assert time.perf_counter() - t < 0.05
        api.release.set()
        api.hang.clear()
    finally:
        sink.close()
    assert api.merged()["progress"]["step"] == 400
    assert api.merged()["evaluation"] == {"evalLoss": 1.0}


def test_status_sink_close_gives_up_quickly_when_the_api_is_gone():
    api = FakeApi()
    api.down = True
    sink = KubernetesStatusSink(lambda: api.patch, interval=0.05, max_backoff=30)
    sink.progress(progress(1), "begin")
    wait_until(lambda: api.failures >= 1)
    t = time.monotonic()
    sink.close()
    assert time.monotonic() - t < 2  # not the 30 s backoff
    assert api.failures >= 2  # a last try on close


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
            'kubetune_trainer_step{namespace="ml",run="r1"} 1.0'
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


def test_status_reaches_the_api_server_through_an_outage(make_config, tmp_path, monkeypatch):
    """The real client against the emulator over HTTP: the status PATCH fails for a while mid-run."""
    from tests.operator.emulator import ApiServer

    server = ApiServer().start()
    try:
        res = server.resource(contract.API_GROUP, contract.API_PLURAL)
        body = {"apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}", "kind": "TrainingRun"}
        server.call(lambda: server.create(res, "ml", {**body, "metadata": {"name": "r1", "namespace": "ml"}}))
        kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        status_sink = KubernetesStatusSink(lambda: status_patcher("ml", "r1"), interval=0.2, max_backoff=0.5)

        seen: list[int] = []

        class Outage(Sink):
            """The API refuses status patches from step 2 to step 5."""

            def progress(self, p: Progress, event: str | None) -> None:
                if event is None and p.step == 2:
                    server.fail("PATCH", r"/trainingruns/r1/status$", 503, times=10**6)
                if event is None and p.step == 5:
                    seen.append(10**6 - server.faults[0][3])  # patches refused
                    server.faults.clear()

        cfg = make_config(**{"training.maxSteps": 8, "evaluation.evalSteps": 4})
        result = run(cfg, sinks=[Outage(), status_sink])
        assert result.metrics["global_step"] == 8
        status = server.call(lambda: server.get(res, "ml", "r1"))["status"]
        assert status["progress"]["step"] == 8 and status["progress"]["percent"] == 100.0
        assert status["checkpoint"]["latest"]["step"] == 8
        assert status["evaluation"]["evalLoss"] == pytest.approx(result.metrics["eval_loss"])
        assert status["preflight"]["checks"]
        assert seen and seen[0] >= 1, "the sink kept trying during the outage"
    finally:
        server.stop()
