"""Evaluation throughput: batched greedy generation (what `kubetune-train eval` and the end of a run do)
against generating for one prompt at a time, on the same model, prompts and token budget, side by side.

Both use `kubetune_trainer.evaluate.generate_completions`; the baseline passes batch_size=1. The model
is the quickstart's size (random-initialised Qwen2, built locally), so it rarely stops early: every
prompt costs the full token budget in both variants. The answers must be identical (greedy decoding
with left padding changes nothing), which the script checks.

    python bench/eval_throughput.py [--prompts 128] [--new-tokens 16] [--batch 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per variant; the median counts")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer.evaluate import generate_completions
    from kubetune_trainer.qa import render_pairs
    from kubetune_trainer.quickstart import BRANCH_TEMPLATES, branch_records, build_tiny_model

    pairs = render_pairs(branch_records(48), BRANCH_TEMPLATES)
    prompts = [p["prompt"] for p in pairs][: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(
            [p["prompt"] + p["completion"] for p in pairs], Path(tmp), hidden_size=args.hidden, layers=args.layers
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)

    def timed(batch: int) -> tuple[float, list[str]]:
        started = time.perf_counter()
        out = generate_completions(model, tokenizer, prompts, max_new_tokens=args.new_tokens, batch_size=batch)
        return time.perf_counter() - started, out

    timed(args.batch)  # warm up kernels and caches for both
    seconds: dict[str, list[float]] = {"one at a time": [], f"batched ({args.batch})": []}
    answers = {}
    for _ in range(args.rounds):
        for name, batch in (("one at a time", 1), (f"batched ({args.batch})", args.batch)):
            elapsed, answers[name] = timed(batch)
            seconds[name].append(elapsed)
    one, batched = answers.values()
    same = sum(a == b for a, b in zip(one, batched, strict=True))

    print(
        f"{len(prompts)} prompts, {args.new_tokens} new tokens each, Qwen2 hidden {args.hidden} x {args.layers} "
        f"layers on {device} ({torch.get_num_threads()} threads); median of {args.rounds} rounds"
    )
    rates = {name: len(prompts) / statistics.median(s) for name, s in seconds.items()}
    for name, rate in rates.items():
        print(f"  {name:<16} {rate:8.1f} samples/s   ({statistics.median(seconds[name]):.2f} s)")
    base, fast = rates.values()
    print(f"  ratio            {fast / base:8.2f}x   (identical answers: {same}/{len(prompts)})")


if __name__ == "__main__":
    main()
