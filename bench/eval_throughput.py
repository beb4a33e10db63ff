"""Evaluation throughput: batched greedy generation (what `kubetune-train eval` and the end of a run do)
against generating for one prompt at a time, on the same model, prompts and token budget, side by side.

Both use `kubetune_trainer.evaluate.generate_completions`; the baseline passes batch_size=1. The model
is the quickstart's size (random-initialised Qwen2, built locally), so it rarely stops early: every
prompt costs the full token budget in both variants. The answers must be identical (greedy decoding
with left padding changes nothing); the script fails if any differs.

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
    baseline, batched = "baseline: one at a time (batch 1)", f"batched (batch {args.batch})"
    seconds: dict[str, list[float]] = {baseline: [], batched: []}
    answers: dict[str, list[str]] = {}
    for _ in range(args.rounds):  # alternate, so drift in the machine's load hits both alike
        for name, batch in ((baseline, 1), (batched, args.batch)):
            elapsed, answers[name] = timed(batch)
            seconds[name].append(elapsed)
    same = sum(a == b for a, b in zip(answers[baseline], answers[batched], strict=True))

    print(
        f"Evaluation throughput: {len(prompts)} prompts, {args.new_tokens} new tokens each, greedy; Qwen2 hidden "
        f"{args.hidden} x {args.layers} layers on {device} ({torch.get_num_threads()} threads); "
        f"median of {args.rounds} rounds"
    )
    rates = {name: len(prompts) / statistics.median(s) for name, s in seconds.items()}
    width = max(map(len, rates))
    print(f"  {'variant':<{width}}   samples/s   seconds")
    for name, rate in rates.items():
        print(f"  {name:<{width}}   {rate:9.1f}   {statistics.median(seconds[name]):7.2f}")
    print(f"  ratio batched / baseline: {rates[batched] / rates[baseline]:.2f}x")
    print(f"  identical answers: {same}/{len(prompts)}")
    if same != len(prompts):
        raise SystemExit("batched generation changed some answers: the comparison is not like for like")


if __name__ == "__main__":
    main()
