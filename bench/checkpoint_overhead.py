"""What checkpoints cost, and how fast a preempted run is back to training.

1. Save cost: one run at the default evaluation and checkpoint settings (a validation split,
   about ten evaluations, a save at each new best and at the end, checkpoints.everyMinutes: 10),
   with every save timed where it happens: Trainer's write of the checkpoint and kubetune's
   commit (fsync and sha256 of every file, the manifest, the rename, the prune). Reported: the
   median save, the saves that run made and their share of its training time, and the share
   for a one-hour run at the same defaults (ten evaluations' worth of best saves, six periodic
   ones, the final one).
2. Restart: `kubetune-train run` as a process, from process start to the first optimizer
   step logged: a cold start against a resume from a checkpoint (after SIGTERM).

    python bench/checkpoint_overhead.py [--hidden 512] [--layers 8] [--rank 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
DEFAULT_INTERVAL_S = 600
HOUR_S = 3600


def config(work: Path, name: str, args: argparse.Namespace, **training) -> dict:
    return {
        "model": {"nameOrPath": str(work / "model")},
        "dataset": {
            "path": str(work / "qa.jsonl"),
            "maxSeqLength": 64,
            "validationSplit": 0,
            "testSplit": 0,
            "preparedDir": str(work / name / "prepared"),  # in the bench's own directory, not the cwd
        },
        "lora": {"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.0},
        "training": {"maxSteps": args.steps, "batchSize": 8, "learningRate": 1e-3, "loggingSteps": 1, **training},
        "checkpoints": {"dir": str(work / name / "ckpt")},
        "output": {"dir": str(work / name / "out")},
    }


def save_cost(work: Path, args: argparse.Namespace) -> dict:
    from kubetune_trainer import checkpoints
    from kubetune_trainer.config import TrainConfig
    from kubetune_trainer.train import finish, setup, train

    raw = config(work, "saves", args)
    raw["dataset"]["validationSplit"] = 0.1  # the default: evaluations, and a save at each new best
    recipe = setup(TrainConfig.model_validate(raw), sinks=[])
    try:
        metrics = finish(recipe, train(recipe)).metrics
    finally:
        recipe.reporter.close()
    saves = recipe.stop.save_seconds  # timed in the run: Trainer's write through kubetune's commit
    evaluations = sum(1 for h in recipe.trainer.state.log_history if "eval_loss" in h)
    median = statistics.median(saves)
    # A one-hour run at the defaults: at most one save per evaluation (a new best), one every
    # everyMinutes, and the final one.
    hour_saves = (evaluations - 1) + HOUR_S // DEFAULT_INTERVAL_S + 1
    return {
        "saves": len(saves),
        "evaluations": evaluations,
        "median_save_s": median,
        "min_save_s": min(saves),
        "max_save_s": max(saves),
        "train_s": metrics["train_runtime_seconds"],
        "share_of_run": sum(saves) / metrics["train_runtime_seconds"],
        "hour_saves": hour_saves,
        "share_of_hour": hour_saves * median / HOUR_S,
        "checkpoint_mb": checkpoints.size_bytes(recipe.committer.latest.path) / 1e6,
    }


def first_step_seconds(config_path: Path, step: int, *, then: signal.Signals = signal.SIGKILL) -> float:
    """Seconds from process start to the log line of optimizer step `step`; then send `then`
    (SIGKILL: stop measuring; SIGTERM: save a checkpoint there and exit 143)."""
    script = Path(sys.executable).with_name("kubetune-train")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kubetune_trainer.cli"]
    started = time.monotonic()
    proc = subprocess.Popen(
        [*command, "run", str(config_path)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    elapsed = None
    for line in proc.stderr:
        m = re.search(r"step (\d+)/\d+ \(", line)
        if m and int(m.group(1)) >= step:
            elapsed = time.monotonic() - started
            proc.send_signal(then)
            break
    proc.communicate()
    if elapsed is None:
        sys.exit(f"never reached step {step} (exit {proc.returncode})")
    return elapsed


def restart(work: Path, args: argparse.Namespace, repeats: int = 3) -> dict:
    """Best of `repeats` for each, after a warm-up run (page cache, the prepared data)."""
    import shutil

    cold = work / "cold.yaml"
    cold.write_text(yaml.safe_dump(config(work, "cold", args)))
    resumed = work / "resumed.yaml"
    resumed.write_text(yaml.safe_dump(config(work, "resumed", args)))
    stop = args.steps // 2
    first_step_seconds(resumed, stop, then=signal.SIGTERM)  # trains to `stop`, saves, exits 143
    first_step_seconds(cold, 1)  # warm-up; leaves the cold run's prepared data in place
    cold_s, resumed_s = [], []
    for _ in range(repeats):
        shutil.rmtree(work / "cold" / "ckpt", ignore_errors=True)
        shutil.rmtree(work / "cold" / "out", ignore_errors=True)
        cold_s.append(first_step_seconds(cold, 1))
        resumed_s.append(first_step_seconds(resumed, stop + 2))  # killed before its next save
    return {"cold_s": min(cold_s), "resumed_s": min(resumed_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from kubetune_trainer.qa import render_pairs
    from kubetune_trainer.quickstart import BRANCH_TEMPLATES, branch_records, build_tiny_model

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        work = Path(tmp)
        pairs = render_pairs(branch_records(48), BRANCH_TEMPLATES)
        (work / "qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        build_tiny_model(
            [p["prompt"] + p["completion"] for p in pairs],
            work / "model",
            hidden_size=args.hidden,
            layers=args.layers,
            heads=max(2, args.hidden // 64),
        )
        cost = save_cost(work, args)
        startup = restart(work, args)

    print(f"model: Qwen2 hidden {args.hidden}, {args.layers} layers, LoRA r={args.rank}; {args.steps} steps of batch 8")
    print(f"checkpoint size                                   {cost['checkpoint_mb']:8.1f} MB")
    print(
        f"one save, median of {cost['saves']} (write + fsync, sha256 manifest, rename) "
        f"{cost['median_save_s']:8.3f} s (min {cost['min_save_s']:.3f}, max {cost['max_save_s']:.3f})"
    )
    print(
        f"saves in this {cost['train_s']:.0f} s run at the defaults ({cost['evaluations']} evaluations): "
        f"{cost['saves']}, {cost['share_of_run']:.2%} of its training time"
    )
    print(f"a one-hour run at the defaults: {cost['hour_saves']} saves, {cost['share_of_hour']:.3%} of its time")
    print(f"process start to first step, cold start (baseline)  {startup['cold_s']:6.2f} s")
    print(f"process start to first step after resume            {startup['resumed_s']:6.2f} s")
    print(f"ratio resume/cold: {startup['resumed_s'] / startup['cold_s']:.2f}x")


if __name__ == "__main__":
    main()
