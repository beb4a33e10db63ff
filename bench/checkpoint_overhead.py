"""What checkpoints cost, and how fast a preempted run is back to training.

1. Save overhead: the same run twice, side by side in this process: once saving only at
   the end, once saving every --every steps. The difference in training time divided by
   the number of extra saves is the cost of one save (Trainer's write plus kubetune's
   fsync, sha256 manifest and rename). Its share of training time at the default interval
   (checkpoints.everyMinutes: 10) is cost / (600 s + cost).
2. Restart: `kubetune-train run` as a process, from process start to the first optimizer
   step logged: a cold start against a resume from a checkpoint (after SIGTERM).

    python bench/checkpoint_overhead.py [--hidden 512] [--layers 8] [--rank 64]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
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


def config(work: Path, name: str, args: argparse.Namespace, **training) -> dict:
    return {
        "model": {"nameOrPath": str(work / "model")},
        "dataset": {"path": str(work / "qa.jsonl"), "maxSeqLength": 64, "validationSplit": 0, "testSplit": 0},
        "lora": {"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.0},
        "training": {"maxSteps": args.steps, "batchSize": 8, "learningRate": 1e-3, "loggingSteps": 1, **training},
        "checkpoints": {"dir": str(work / name / "ckpt"), "everyMinutes": None},
        "output": {"dir": str(work / name / "out")},
    }


def save_overhead(work: Path, args: argparse.Namespace) -> dict:
    from kubetune_trainer import checkpoints
    from kubetune_trainer.config import TrainConfig
    from kubetune_trainer.train import run

    timings = {}
    for name, every in (("end-only", None), ("periodic", args.every)):
        raw = config(work, name, args)
        raw["checkpoints"]["everySteps"] = every
        raw["checkpoints"]["keep"] = 2
        metrics = run(TrainConfig.model_validate(raw), sinks=[]).metrics
        timings[name] = metrics["train_runtime_seconds"]
    saves = args.steps // args.every - 1  # the final save happens in both runs
    (latest,) = checkpoints.scan(work / "end-only" / "ckpt")
    per_save = (timings["periodic"] - timings["end-only"]) / saves
    return {
        "train_s_end_only": timings["end-only"],
        "train_s_periodic": timings["periodic"],
        "extra_saves": saves,
        "per_save_s": per_save,
        "checkpoint_mb": checkpoints.size_bytes(latest.path) / 1e6,
        "share_at_default": max(per_save, 0.0) / (DEFAULT_INTERVAL_S + max(per_save, 0.0)),
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
    """Best of `repeats` for each, after a warm-up run (page cache, datasets cache)."""
    import shutil

    cold = work / "cold.yaml"
    cold.write_text(yaml.safe_dump(config(work, "cold", args)))
    resumed = work / "resumed.yaml"
    resumed.write_text(yaml.safe_dump(config(work, "resumed", args)))
    stop = args.steps // 2
    first_step_seconds(resumed, stop, then=signal.SIGTERM)  # trains to `stop`, saves, exits 143
    first_step_seconds(cold, 1)  # warm-up
    cold_s, resumed_s = [], []
    for _ in range(repeats):
        shutil.rmtree(work / "cold", ignore_errors=True)
        cold_s.append(first_step_seconds(cold, 1))
        resumed_s.append(first_step_seconds(resumed, stop + 2))  # killed before its next save
    return {"cold_s": min(cold_s), "resumed_s": min(resumed_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=6, help="periodic save interval in steps")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from kubetune_trainer.qa import render_pairs
    from kubetune_trainer.quickstart import BRANCH_TEMPLATES, branch_records, build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs = render_pairs(branch_records(48), BRANCH_TEMPLATES)
        (work / "qa.jsonl").write_text("".join(__import__("json").dumps(p) + "\n" for p in pairs))
        build_tiny_model(
            [p["prompt"] + p["completion"] for p in pairs],
            work / "model",
            hidden_size=args.hidden,
            layers=args.layers,
            heads=max(2, args.hidden // 64),
        )
        overhead = save_overhead(work, args)
        startup = restart(work, args)

    print(f"model: Qwen2 hidden {args.hidden}, {args.layers} layers, LoRA r={args.rank}; {args.steps} steps of batch 8")
    print(f"checkpoint size                         {overhead['checkpoint_mb']:8.1f} MB")
    print(f"train time, save at end only (baseline) {overhead['train_s_end_only']:8.2f} s")
    print(
        f"train time, save every {args.every} steps          {overhead['train_s_periodic']:8.2f} s "
        f"({overhead['extra_saves']} extra saves)"
    )
    print(f"one save                                {overhead['per_save_s']:8.3f} s")
    print(f"share of training time at the default interval (10 min): {overhead['share_at_default']:.4%}")
    print(f"process start to first step, cold start (baseline)  {startup['cold_s']:6.2f} s")
    print(f"process start to first step after resume            {startup['resumed_s']:6.2f} s")
    print(f"ratio resume/cold: {startup['resumed_s'] / startup['cold_s']:.2f}x")


if __name__ == "__main__":
    main()
