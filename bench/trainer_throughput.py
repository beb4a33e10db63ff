"""Training throughput and peak memory: kubetune-train against plain transformers Trainer + peft.

Both variants train the same locally built model with the same LoRA settings, data,
batch size, learning rate and number of steps, and count tokens the same way (Trainer's
non-padding token counter over its own train_runtime). Each runs in its own child
process so peak memory is its own (GPU: torch's peak allocation; CPU: the process's peak RSS,
which the libraries dominate). The baseline is what a plain script does:
tokenize prompt + completion, `DataCollatorForLanguageModeling(mlm=False)` (pads each
batch to its longest sample), random batches.

    python bench/trainer_throughput.py [--steps 30] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MAX_LEN = 512
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


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
    from kubetune_trainer.train import run

    cfg = TrainConfig.model_validate(
        {
            "model": {"nameOrPath": str(work / "model")},
            "dataset": {
                "path": str(work / "data.jsonl"),
                "maxSeqLength": MAX_LEN,
                "validationSplit": 0,
                "testSplit": 0,
            },
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "training": {"maxSteps": args.steps, "batchSize": args.batch, "learningRate": 1e-3, "loggingSteps": 10},
            "checkpoints": {"dir": str(work / "kt-ckpt")},
            "output": {"dir": str(work / "kt-out")},
        }
    )
    m = run(cfg, sinks=[]).metrics
    return {"tokens": m["train_tokens"], "seconds": m["train_runtime_seconds"]}


def run_baseline(work: Path, args: argparse.Namespace) -> dict:
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
            output_dir=str(work / "base-out"),
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
        ),
        train_dataset=ds,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    out = trainer.train()
    return {"tokens": trainer.state.num_input_tokens_seen, "seconds": out.metrics["train_runtime"]}


def child(variant: str, work: Path, args: argparse.Namespace) -> None:
    import logging

    logging.disable(logging.WARNING)
    result = (run_kubetune if variant == "kubetune" else run_baseline)(work, args)
    result["peak_memory_mb"] = peak_memory_mb()
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--child", choices=["kubetune", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work, args)
        return

    from kubetune_trainer.quickstart import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = make_data(work / "data.jsonl", args.rows)
        build_tiny_model(
            [r["prompt"] + r["completion"] for r in rows[:500]],
            work / "model",
            hidden_size=args.hidden,
            layers=args.layers,
            heads=max(2, args.hidden // 64),
        )
        results = {}
        for variant in ("baseline", "kubetune"):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", variant, "--work", str(work), *sys.argv[1:]],
                capture_output=True,
                text=True,
                check=False,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            results[variant] = json.loads(line.removeprefix("RESULT "))

    print(
        f"model: Qwen2 hidden {args.hidden}, {args.layers} layers; {args.steps} steps of batch {args.batch}; "
        f"{args.rows} rows, max {MAX_LEN} tokens"
    )
    print(f"{'variant':<44} {'tokens/s':>10} {'peak MB':>9}")
    names = {
        "baseline": "transformers Trainer + peft (pad to longest)",
        "kubetune": "kubetune-train (length-grouped batches)",
    }
    for variant, r in results.items():
        tps = r["tokens"] / r["seconds"]
        r["tokens_per_second"] = tps
        print(f"{names[variant]:<44} {tps:>10,.0f} {r['peak_memory_mb']:>9,.0f}")
    kt, base = results["kubetune"], results["baseline"]
    print(
        f"ratio kubetune/baseline: throughput {kt['tokens_per_second'] / base['tokens_per_second']:.2f}x, "
        f"peak memory {kt['peak_memory_mb'] / base['peak_memory_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
