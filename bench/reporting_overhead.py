"""Reporting overhead: training step time with every sink on against no reporting at all, same run, side by side.

"off" trains without the progress tracker: no record is built, no sink called. "on" trains with
all four sinks, each harder-pressed than in a cluster: the terminal sink writing a log line at
every step (logging goes to a file at INFO, in both variants, as a pod's log would), output/
progress.jsonl, the Prometheus endpoint scraped every second (a PodMonitor scrapes every 15 s),
and the Kubernetes status sink patching a TrainingRun on an API server every second (the default
is 5 s). The API server (the test emulator, real HTTP on 127.0.0.1) and the scraper run in a
process of their own, as they would on other machines; they share this machine's cores in both
variants. Rounds alternate off/on in one process on the same model and data, the order swapped
every round (off-on, on-off, ...), so neither drift in the machine nor going first favours one.
A step's time is the median wall time between consecutive optimizer steps, and
its CPU time that of the whole trainer process (every thread: torch's, the status sink's, the
metrics server's) over the same interval: on a machine other work also loads, wall time measures
that load as much as the sinks, and CPU time is the steadier figure.

    python bench/reporting_overhead.py [--steps 80] [--rounds 6] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.operator.emulator: the API server

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from bench.trainer_throughput import make_data_and_model
from transformers import TrainerCallback

from kubetune_trainer.sinks import (
    FileSink,
    KubernetesStatusSink,
    PrometheusSink,
    Sink,
    TerminalSink,
    status_patcher,
)


class StepClock(TrainerCallback):
    """Wall and process CPU time between consecutive optimizer steps: a Trainer callback, so that it
    needs no progress record and costs both variants the same."""

    def __init__(self) -> None:
        self.last: tuple[float, float] | None = None
        self.gaps: list[tuple[float, float]] = []

    def on_step_end(self, *_: Any, **__: Any) -> None:
        now = (time.perf_counter(), time.process_time())
        if self.last is not None:
            self.gaps.append((now[0] - self.last[0], now[1] - self.last[1]))
        self.last = now


# The cluster's side, in its own process: an API server holding the TrainingRun "ml/bench", and a scraper of
# the trainer's metrics port every second (refused while a round runs without reporting).
CLUSTER = r"""
import contextlib, sys, time, urllib.request
from pathlib import Path
from tests.operator.emulator import ApiServer
from kubetune_trainer import contract

kubeconfig, port = Path(sys.argv[1]), int(sys.argv[2])
server = ApiServer().start()
runs = server.resource(contract.API_GROUP, contract.API_PLURAL)
body = {"apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}", "kind": "TrainingRun"}
server.call(lambda: server.create(runs, "ml", {**body, "metadata": {"name": "bench", "namespace": "ml"}}))
server.kubeconfig(kubeconfig)
print("ready", flush=True)
while True:
    time.sleep(1)
    with contextlib.suppress(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
"""


def thread_cpu_seconds(thread: threading.Thread | None) -> float:
    """CPU time a live thread of this process has used (Linux: /proc/self/task/<tid>/schedstat, in ns)."""
    if thread is None or thread.native_id is None:
        return 0.0
    return int(Path(f"/proc/self/task/{thread.native_id}/schedstat").read_text().split()[0]) / 1e9


@dataclass
class Round:
    gaps: list[tuple[float, float]]  # (wall, process CPU) seconds between consecutive steps
    steps: int
    foreground: float = 0.0  # CPU seconds the training thread spent building records and in the sinks
    background: float = 0.0  # CPU seconds of the status sink's and the metrics server's threads


def train_once(work: Path, name: str, args: argparse.Namespace, sinks: list[Sink] | None) -> Round:
    """sinks None: no reporting at all (the progress tracker removed)."""
    from kubetune_trainer.config import TrainConfig
    from kubetune_trainer.report import ProgressTracker
    from kubetune_trainer.train import finish, setup, train

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
    recipe = setup(cfg, sinks=sinks or [])
    spent = [0.0]
    if sinks is None:
        recipe.trainer.remove_callback(ProgressTracker)
    else:
        (tracker,) = [c for c in recipe.trainer.callback_handler.callbacks if isinstance(c, ProgressTracker)]
        emit = tracker._emit

        def timed_emit(*a: Any) -> None:  # every record: built, then handed to each sink
            started = time.thread_time()
            emit(*a)
            spent[0] += time.thread_time() - started

        tracker._emit = timed_emit  # type: ignore[method-assign]
    recipe.trainer.add_callback(clock)
    # The sinks that work in a thread of their own (the status patcher, Prometheus' HTTP server): its CPU counts.
    threads = [t for s in sinks or [] if (t := getattr(s, "_thread", None) or getattr(s, "thread", None))]
    threaded = [s for s in sinks or [] if isinstance(s, KubernetesStatusSink | PrometheusSink)]
    assert len(threads) == len(threaded), "a sink's thread was renamed: its CPU would silently count as 0"
    try:  # what train.run does
        metrics = train(recipe)
        background = sum(thread_cpu_seconds(t) for t in threads)  # before close() ends them
        finish(recipe, metrics)
    finally:
        recipe.reporter.close()
    # The first steps warm up allocators and caches.
    return Round(clock.gaps[2:], recipe.trainer.state.global_step, spent[0], background)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    from tests.operator.conftest import free_port

    gaps: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    foreground = background = 0.0
    on_steps = 0
    patches = 0
    port = free_port()  # the trainer's metrics port, every round
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cluster = subprocess.Popen(
            [sys.executable, "-c", CLUSTER, str(work / "kubeconfig"), str(port)],
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert cluster.stdout is not None and cluster.stdout.readline().strip() == "ready"
            os.environ["KUBECONFIG"] = str(work / "kubeconfig")
            # As kubetune-train logs: INFO, the libraries quiet; to a file, as a pod's log, in both variants.
            logging.basicConfig(
                level=logging.INFO, filename=work / "train.log", format="%(asctime)s %(levelname)-7s %(message)s"
            )
            for noisy in ("transformers", "datasets", "peft", "accelerate", "torch", "urllib3", "filelock"):
                logging.getLogger(noisy).setLevel(logging.ERROR)
            make_data_and_model(work, args)
            train_once(work, "warmup", argparse.Namespace(**{**vars(args), "steps": 5}), None)  # prepares the data
            # The status sink's first patch imports the kubernetes client (seconds of CPU, once per run, in the
            # sink's thread); done here, so that the rounds measure what each step costs.
            importlib.import_module("kubernetes")
            for round_ in range(args.rounds):
                for variant in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                    if variant == "off":
                        gaps["off"] += train_once(work, f"off{round_}", args, None).gaps
                        continue
                    status = KubernetesStatusSink(lambda: status_patcher("ml", "bench"), interval=1.0)
                    sinks: list[Sink] = [
                        TerminalSink(interactive=False),
                        FileSink(work / f"on{round_}" / "output" / "progress.jsonl"),
                        PrometheusSink(port),
                        status,
                    ]
                    result = train_once(work, f"on{round_}", args, sinks)
                    gaps["on"] += result.gaps
                    foreground, background = foreground + result.foreground, background + result.background
                    on_steps += result.steps
                    patches += status.sent
                off, on = (median(gaps[v], 0) * 1e3 for v in ("off", "on"))
                print(f"round {round_ + 1}/{args.rounds}: median step {off:.1f} ms off, {on:.1f} ms on", flush=True)
            step_lines = len(re.findall(r"INFO +step \d+/\d+ \(", (work / "train.log").read_text()))
        finally:
            cluster.kill()
            cluster.wait()

    print(
        f"model: Qwen2 hidden {args.hidden}, {args.layers} layers; batch {args.batch}; "
        f"{args.rounds} rounds of {args.steps} steps per variant, alternating, the order swapped each round"
    )
    print(f"{'variant':<58} {'median step ms':>14} {'mean step ms':>12} {'median CPU ms':>13}")
    for name, variant in (("no reporting", "off"), ("all sinks on (terminal, jsonl, Prometheus 1s, status 1s)", "on")):
        g = gaps[variant]
        print(
            f"{name:<58} {median(g, 0) * 1e3:>14.1f} {statistics.mean(w for w, _ in g) * 1e3:>12.1f} "
            f"{median(g, 1) * 1e3:>13.1f}"
        )
    print(f"status patches sent: {patches}; terminal sink log lines written: {step_lines}")
    wall, cpu = (median(gaps["on"], k) / median(gaps["off"], k) for k in (0, 1))
    print(
        f"ratio on/off, median step time: wall {wall:.3f}x ({100 * (wall - 1):+.1f}%), CPU {cpu:.3f}x "
        f"({100 * (cpu - 1):+.1f}%)"
    )
    # What reporting itself costs, measured where it runs, whatever else loads the machine.
    fg, bg = foreground / on_steps * 1e3, background / on_steps * 1e3
    base = median(gaps["off"], 0) * 1e3
    print(
        f"reporting CPU per step: {fg:.2f} ms on the training thread (records and sinks), {bg:.2f} ms in the "
        f"sinks' threads; {100 * (fg + bg) / base:.2f}% of the median step without reporting"
    )


def median(gaps: list[tuple[float, float]], which: int) -> float:
    """which: 0 for wall time, 1 for CPU time."""
    return statistics.median(g[which] for g in gaps)


if __name__ == "__main__":
    main()
