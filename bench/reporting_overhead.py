"""Reporting overhead: training step time with every sink on against every sink off, same run, side by side.

"off" trains with no sink. "on" trains with all four, each harder-pressed than in a cluster:
the terminal sink (log lines), output/progress.jsonl, the Prometheus endpoint scraped every
second (a PodMonitor scrapes every 15 s), and the Kubernetes status sink patching a TrainingRun
on an API server (the test emulator, real HTTP on 127.0.0.1) every second (the default is 5 s).
Rounds alternate off/on in one process on the same model and data, so drift in the machine
hits both; the step time is the median wall time between consecutive optimizer steps.

    python bench/reporting_overhead.py [--steps 80] [--rounds 3] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.operator.emulator: the API server

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from bench.trainer_throughput import make_data

from kubetune_trainer.report import Progress
from kubetune_trainer.sinks import (
    FileSink,
    KubernetesStatusSink,
    PrometheusSink,
    Sink,
    TerminalSink,
    status_patcher,
)


class StepClock(Sink):
    """Wall time between consecutive optimizer steps (in both variants, so it costs both the same)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.gaps: list[float] = []

    def progress(self, progress: Progress, event: str | None) -> None:
        if event is None:
            now = time.perf_counter()
            if self.last is not None:
                self.gaps.append(now - self.last)
            self.last = now


def scraper(port: int, stop: threading.Event, every: float = 1.0) -> None:
    while not stop.wait(every):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()


def train_once(work: Path, name: str, args: argparse.Namespace, sinks: list[Sink]) -> list[float]:
    from kubetune_trainer.config import TrainConfig
    from kubetune_trainer.train import run

    cfg = TrainConfig.model_validate(
        {
            "model": {"nameOrPath": str(work / "model")},
            "dataset": {
                "path": str(work / "data.jsonl"),
                "maxSeqLength": 256,
                "validationSplit": 0,
                "testSplit": 0,
                "preparedDir": str(work / "prepared"),
            },
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "training": {"maxSteps": args.steps, "batchSize": args.batch, "learningRate": 1e-3, "loggingSteps": 1},
            "checkpoints": {"dir": str(work / name / "checkpoints"), "everySteps": 10**6},
            "output": {"dir": str(work / name / "output")},
        }
    )
    clock = StepClock()
    run(cfg, sinks=[clock, *sinks])
    return clock.gaps[2:]  # the first steps warm up allocators and caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from tests.operator.conftest import free_port
    from tests.operator.emulator import ApiServer

    from kubetune_trainer import contract
    from kubetune_trainer.quickstart import build_tiny_model

    server = ApiServer().start()
    runs = server.resource(contract.API_GROUP, contract.API_PLURAL)
    body = {"apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}", "kind": "TrainingRun"}
    server.call(lambda: server.create(runs, "ml", {**body, "metadata": {"name": "bench", "namespace": "ml"}}))
    gaps: dict[str, list[float]] = {"off": [], "on": []}
    patches = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["KUBECONFIG"] = str(server.kubeconfig(work / "kubeconfig"))
        rows = make_data(work / "data.jsonl", args.rows)
        build_tiny_model(
            [r["prompt"] + r["completion"] for r in rows[:500]],
            work / "model",
            hidden_size=args.hidden,
            layers=args.layers,
            heads=max(2, args.hidden // 64),
        )
        train_once(work, "warmup", argparse.Namespace(**{**vars(args), "steps": 5}), [])  # prepares the data
        for round_ in range(args.rounds):
            gaps["off"] += train_once(work, f"off{round_}", args, [])
            port, stop = free_port(), threading.Event()
            status = KubernetesStatusSink(lambda: status_patcher("ml", "bench"), interval=1.0)
            sinks: list[Any] = [
                TerminalSink(interactive=False),
                FileSink(work / f"on{round_}" / "output" / "progress.jsonl"),
                PrometheusSink(port, {"run": "bench", "namespace": "ml"}),
                status,
            ]
            scraping = threading.Thread(target=scraper, args=(port, stop), daemon=True)
            scraping.start()
            gaps["on"] += train_once(work, f"on{round_}", args, sinks)
            stop.set()
            patches += status.sent
    server.stop()

    off, on = statistics.median(gaps["off"]), statistics.median(gaps["on"])
    print(
        f"model: Qwen2 hidden {args.hidden}, {args.layers} layers; batch {args.batch}; "
        f"{args.rounds} rounds of {args.steps} steps per variant, alternating"
    )
    print(f"{'variant':<58} {'median step ms':>14} {'mean step ms':>12}")
    print(f"{'all sinks off':<58} {off * 1e3:>14.1f} {statistics.mean(gaps['off']) * 1e3:>12.1f}")
    print(
        f"{'all sinks on (terminal, jsonl, Prometheus 1s, status 1s)':<58} {on * 1e3:>14.1f} "
        f"{statistics.mean(gaps['on']) * 1e3:>12.1f}"
    )
    print(f"status patches sent: {patches}")
    print(f"ratio on/off (median step time): {on / off:.3f}x, overhead {100 * (on / off - 1):+.1f}%")


if __name__ == "__main__":
    main()
