"""Training throughput and peak memory: kubetune-train against plain transformers Trainer + peft.

Every variant trains the same locally built model with the same LoRA settings, data,
batch size, learning rate and number of steps, and counts tokens the same way (Trainer's
non-padding token counter over its own train_runtime). Each runs in its own child
process so peak memory is its own (GPU: torch's peak allocation; CPU: the process's peak RSS,
which the libraries dominate). Three variants:

- baseline: what a plain script does: tokenize prompt + completion,
  `DataCollatorForLanguageModeling(mlm=False)` (pads each batch to its longest sample), random batches;
- baseline-grouped: the same with Trainer's own length grouping
  (`train_sampling_strategy="group_by_length"`, formerly `group_by_length=True`), so kubetune is not
  credited with what plain Trainer does with one setting;
- kubetune: `kubetune-train run` with its defaults, the validation split on (5%), so the per-step
  work the defaults add (the per-sample losses behind high_loss_samples.jsonl, the divergence guard)
  is measured. Its evaluations run inside Trainer's train_runtime and are timed apart and left out
  (reported on their own): the baselines evaluate nothing.

Besides tokens per second of wall time, tokens per CPU-second of the training (the process's CPU
time, all threads): on a machine shared with other work the wall time of each variant depends on
what else ran meanwhile; the CPU time much less.

Each variant runs --rounds times (3), alternating with the others; the fastest run of each counts
(other work on the machine only ever adds time), and the median is printed beside it.

    python bench/trainer_throughput.py [--steps 30] [--hidden 256] [--layers 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_LEN = 512
VARIANTS = ("baseline", "baseline-grouped", "kubetune")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def make_data_and_model(work: Path, args: argparse.Namespace) -> None:
    """work/data.jsonl (args.rows rows) and a random-initialised Qwen2 in work/model (args.hidden, args.layers)
    with a tokenizer trained on the data: the benches' common setup."""
    from kubetune_trainer.quickstart import build_tiny_model

    rows = make_data(work / "data.jsonl", args.rows)
    build_tiny_model(
        [r["prompt"] + r["completion"] for r in rows[:500]],
        work / "model",
        hidden_size=args.hidden,
        layers=args.layers,
        heads=max(2, args.hidden // 64),
    )


def make_data(path: Path, rows: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion pairs with a long-tailed length distribution, as real SFT data has."""
    from kubetune_trainer.quickstart import branch_records

    rng = random.Random(seed)
    records = branch_records(48)
    data = []
    for _ in range(rows):
        facts = min(len(records), max(1, int(rng.lognormvariate(1.2, 1.0))))
        chosen = rng.sample(records, facts)
        data.append(
            {
                "prompt": f"Question: list the routing codes of {facts} branches.\nAnswer:",
                "completion": " " + "; ".join(f"{r['branch']} {r['routing_code']}" for r in chosen),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return data


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_kubetune(work: Path, args: argparse.Namespace) -> dict:
    from kubetune_trainer.config import TrainConfig
    from kubetune_trainer.train import finish, setup, train

    out = Path(tempfile.mkdtemp(dir=work, prefix="kubetune-"))  # a fresh run each round, not a resume
    cfg = TrainConfig.model_validate(
        {
            "model": {"nameOrPath": str(work / "model")},
            "dataset": {
                "path": str(work / "data.jsonl"),
                "maxSeqLength": MAX_LEN,
                "validationSplit": 0.02,
                "testSplit": 0,
                "preparedDir": str(out / "prepared"),  # the bench's own directory, not the cwd
            },
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "training": {"maxSteps": args.steps, "batchSize": args.batch, "learningRate": 1e-3, "loggingSteps": 10},
            "evaluation": {"evalSteps": max(1, args.steps // 2)},
            "checkpoints": {"dir": str(out / "checkpoints")},
            "output": {"dir": str(out / "output")},
        }
    )
    # What `kubetune-train run` does (run() adds only the signal handlers), with the evaluations timed
    # apart: they run inside Trainer's train_runtime, and the baselines evaluate nothing.
    recipe = setup(cfg, sinks=[])
    evaluate, spent = recipe.trainer.evaluate, {"wall": 0.0, "cpu": 0.0, "count": 0}

    def timed_evaluate(*a: object, **kw: object) -> dict:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return evaluate(*a, **kw)
        finally:
            spent["wall"] += time.perf_counter() - wall
            spent["cpu"] += time.process_time() - cpu
            spent["count"] += 1

    recipe.trainer.evaluate = timed_evaluate
    cpu = time.process_time()
    metrics = train(recipe)
    cpu = time.process_time() - cpu - spent["cpu"]
    recipe.trainer.evaluate = evaluate
    m = finish(recipe, metrics).metrics
    recipe.reporter.close()
    return {
        "tokens": m["train_tokens"],
        "seconds": m["train_runtime_seconds"] - spent["wall"],
        "cpu_seconds": cpu,
        "eval_seconds": spent["wall"],
        "evaluations": spent["count"],
        "high_loss_lines": len((out / "output" / "high_loss_samples.jsonl").read_text().splitlines()),
    }


def run_baseline(work: Path, args: argparse.Namespace, grouped: bool = False) -> dict:
    import datasets
    import peft
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    ds = datasets.load_dataset("json", data_files=str(work / "data.jsonl"), split="train")
    ds = ds.map(
        lambda b: tokenizer(
            [p + c + tokenizer.eos_token for p, c in zip(b["prompt"], b["completion"], strict=True)],
            truncation=True,
            max_length=MAX_LEN,
        ),
        batched=True,
        remove_columns=ds.column_names,
    )
    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=tempfile.mkdtemp(dir=work, prefix="baseline-"),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            learning_rate=1e-3,
            lr_scheduler_type="cosine",
            warmup_steps=0.03,
            bf16=dtype == torch.bfloat16,
            use_cpu=not torch.cuda.is_available(),
            save_strategy="no",
            report_to="none",
            logging_steps=10,
            disable_tqdm=True,
            include_num_input_tokens_seen="non_padding",
            # transformers 5 spells group_by_length=True this way; lengths come from input_ids.
            train_sampling_strategy="group_by_length" if grouped else "random",
        ),
        train_dataset=ds,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    cpu = time.process_time()
    out = trainer.train()
    cpu = time.process_time() - cpu
    return {"tokens": trainer.state.num_input_tokens_seen, "seconds": out.metrics["train_runtime"], "cpu_seconds": cpu}


def child(variant: str, work: Path, args: argparse.Namespace) -> None:
    import logging

    logging.disable(logging.WARNING)
    if variant == "kubetune":
        result = run_kubetune(work, args)
    else:
        result = run_baseline(work, args, grouped=variant == "baseline-grouped")
    result["peak_memory_mb"] = peak_memory_mb()
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant, alternating; the best counts")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work, args)
        return

    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_data_and_model(work, args)
        # Alternating, so a burst of other work on the machine hits every variant alike.
        for round_ in range(1, args.rounds + 1):
            for variant in VARIANTS:
                runs[variant].append(run_child(variant, work))
                r = runs[variant][-1]
                print(
                    f"round {round_}/{args.rounds} {variant}: {r['tokens']:,} tokens, "
                    f"{r['tokens_per_second']:,.0f} tokens/s, "
                    f"{r['tokens_per_cpu_second']:,.0f} tokens/cpu-s (load {os.getloadavg()[0]:.1f})",
                    file=sys.stderr,
                    flush=True,
                )

    print(
        f"model: Qwen2 hidden {args.hidden}, {args.layers} layers; {args.steps} steps of batch {args.batch}; "
        f"{args.rows} rows, max {MAX_LEN} tokens; best of {args.rounds} alternating rounds "
        f"(load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
    print(f"{'variant':<50} {'tokens/s':>9} {'(median)':>9} {'tokens/cpu-s':>12} {'peak MB':>8}")
    names = {
        "baseline": "transformers Trainer + peft (pad to longest)",
        "baseline-grouped": "transformers Trainer + peft, group_by_length",
        "kubetune": "kubetune-train (length-grouped, validation on)",
    }
    best = {}
    for variant, results in runs.items():
        # Other work only ever adds time: the fastest run is the closest to the variant's own cost.
        best[variant] = b = {
            "tokens_per_second": max(r["tokens_per_second"] for r in results),
            "median": statistics.median(r["tokens_per_second"] for r in results),
            "tokens_per_cpu_second": max(r["tokens_per_cpu_second"] for r in results),
            "peak_memory_mb": statistics.median(r["peak_memory_mb"] for r in results),
        }
        print(
            f"{names[variant]:<50} {b['tokens_per_second']:>9,.0f} {b['median']:>9,.0f} "
            f"{b['tokens_per_cpu_second']:>12,.0f} {b['peak_memory_mb']:>8,.0f}"
        )
    kt = best["kubetune"]
    for base in ("baseline", "baseline-grouped"):
        b = best[base]
        print(
            f"ratio kubetune/{base}: throughput {kt['tokens_per_second'] / b['tokens_per_second']:.2f}x "
            f"(per CPU-second {kt['tokens_per_cpu_second'] / b['tokens_per_cpu_second']:.2f}x), "
            f"peak memory {kt['peak_memory_mb'] / b['peak_memory_mb']:.2f}x"
        )
    last = runs["kubetune"][-1]
    print(
        f"kubetune: {last['evaluations']} evaluations per run, {last['eval_seconds']:.1f} s in the last (left out "
        f"of its numbers); {last['high_loss_lines']} high-loss sample lines written"
    )


def run_child(variant: str, work: Path) -> dict:
    """One variant in a process of its own, so its peak memory is its own."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--work", str(work), *sys.argv[1:]],
        capture_output=True,
        text=True,
        check=False,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(line.removeprefix("RESULT "))
    result["tokens_per_second"] = result["tokens"] / result["seconds"]
    result["tokens_per_cpu_second"] = result["tokens"] / result["cpu_seconds"]
    return result


if __name__ == "__main__":
    main()
