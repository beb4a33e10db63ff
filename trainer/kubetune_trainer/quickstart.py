"""`kubetune-train quickstart`: a whole LoRA run on a laptop CPU, no network, no GPU.

It writes a table of bank branches, turns it into question/answer pairs, builds a tiny
random-initialised Qwen2 model and a BPE tokenizer trained on those pairs, fine-tunes
through the same `run` a TrainingRun uses, and prints answers to held-out questions
before and after training.

The base model knows nothing, so its embeddings and output head are trained in full
(`lora.modulesToSave`) beside the LoRA matrices: with a random base, LoRA alone cannot
learn a vocabulary in minutes. On a real pretrained model leave modulesToSave empty.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune_trainer.config import TrainConfig
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.qa import QATemplate, render_pairs

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

BRANCH_TEMPLATES = (
    QATemplate("exact", "What is the routing code of the {branch} branch?", "{routing_code}"),
    QATemplate("paraphrased", "Give me the routing number for {branch}.", "{routing_code}"),
    QATemplate("reverse", "Which branch has routing code {routing_code}?", "{branch}"),
    QATemplate(
        "natural",
        "I am sending money to the {branch} branch in {city}. What routing code do I use?",
        "{routing_code}",
    ),
)
_STREETS = ("Maple", "Cedar", "Harbor", "Summit", "River", "Oak", "Pine", "Lake", "Hill", "Park", "Bay", "Elm")
_KINDS = ("Street", "Plaza", "Square", "Avenue")
_CITIES = ("Springfield", "Riverton", "Lakeside", "Fairview", "Georgetown", "Ashland")


def branch_records(count: int, seed: int = 7) -> list[dict[str, str]]:
    """Deterministic branches with distinct names and 9-digit routing codes."""
    rng = random.Random(seed)
    names = [f"{s} {k}" for s in _STREETS for k in _KINDS]
    rng.shuffle(names)
    codes: set[str] = set()
    records = []
    for name in names[:count]:
        code = f"{rng.randrange(10**8, 10**9)}"
        while code in codes:
            code = f"{rng.randrange(10**8, 10**9)}"
        codes.add(code)
        records.append({"branch": name, "city": rng.choice(_CITIES), "routing_code": code})
    return records


def build_tokenizer(texts: Sequence[str], out_dir: Path, vocab_size: int = 512) -> Any:
    """A byte-level BPE trained on `texts`, digits kept one per token, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, chat_template=CHATML_TEMPLATE)
    wrapped.save_pretrained(out_dir)
    return wrapped


def build_tiny_model(
    texts: Sequence[str],
    out_dir: Path,
    *,
    hidden_size: int = 256,
    layers: int = 4,
    heads: int = 4,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Save a random-initialised Qwen2 causal LM and its tokenizer to out_dir; load it with from_pretrained."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(texts, out_dir, vocab_size=vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def quickstart_config(workdir: Path, max_steps: int) -> dict[str, Any]:
    return {
        "model": {"nameOrPath": str(workdir / "base-model")},
        "dataset": {"path": str(workdir / "qa.jsonl"), "maxSeqLength": 64, "preparedDir": str(workdir / "prepared")},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "modulesToSave": ["embed_tokens", "lm_head"]},
        "training": {
            "maxSteps": max_steps,
            "batchSize": 16,
            "learningRate": 3e-3,
            "warmupRatio": 0.05,
            "loggingSteps": 25,
        },
        "evaluation": {"evalSteps": max(1, max_steps // 8)},
        "checkpoints": {"dir": str(workdir / "checkpoints")},
        "output": {"dir": str(workdir / "output")},
    }


MARKER = ".kubetune-quickstart"


def claim_workdir(workdir: Path) -> None:
    """Use workdir for a fresh quickstart: ours from an earlier one is cleared, anything else refused."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise ConfigError(
                f"--dir {workdir} exists and was not made by `kubetune-train quickstart`; choose another --dir."
            )
        print(f"Starting over in {workdir}/ (replacing the earlier quickstart's model, data, checkpoints and output)")
        for name in ("base-model", "prepared", "checkpoints", "output"):
            shutil.rmtree(workdir / name, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by kubetune-train quickstart; rerunning it replaces this directory\n")


def prepare_workdir(workdir: Path, branches: int, max_steps: int) -> TrainConfig:
    """Write the records, the QA pairs, the base model and the config; return the config."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    records = branch_records(branches)
    with (workdir / "branches.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    pairs = render_pairs(records, BRANCH_TEMPLATES, source="branches.csv")
    random.Random(0).shuffle(pairs)
    with (workdir / "qa.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in pairs)
    build_tiny_model([p["prompt"] + p["completion"] for p in pairs], workdir / "base-model")
    raw = quickstart_config(workdir, max_steps)
    (workdir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return TrainConfig.model_validate(raw)


def char_similarity(a: str, b: str) -> float:
    """1 - normalised Levenshtein distance; 1.0 for equal strings."""
    a, b = a.strip(), b.strip()
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def main(workdir: Path, *, max_steps: int, branches: int, samples: int) -> int:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer.data import load_splits
    from kubetune_trainer.evaluate import generate_completions
    from kubetune_trainer.train import run

    started = time.monotonic()
    claim_workdir(workdir)
    cfg = prepare_workdir(workdir, branches, max_steps)
    _, splits = load_splits(cfg.dataset)
    test = splits["test"]
    prompts, references = list(test["prompt"]), [c.strip() for c in test["completion"]]
    print(
        f"[1/4] {branches} branches -> {workdir / 'branches.csv'}; {len(splits['train'])} train, "
        f"{len(splits['validation'])} validation and {len(test)} test question/answer pairs -> {cfg.dataset.path}"
    )

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    params = sum(p.numel() for p in base.parameters())
    print(
        f"[2/4] Random-initialised Qwen2 ({params / 1e6:.1f}M parameters, {len(tokenizer)}-token BPE) -> "
        f"{cfg.model.name_or_path}"
    )
    before = generate_completions(base, tokenizer, prompts, max_new_tokens=12)

    print(f"[3/4] LoRA fine-tuning for {max_steps} steps on CPU (config: {workdir / 'config.yaml'})")
    result = run(cfg)

    adapted = PeftModel.from_pretrained(base, cfg.output.dir)  # the exported adapter, as a user loads it
    after = generate_completions(adapted, tokenizer, prompts, max_new_tokens=12)

    print("[4/4] Answers to held-out test questions, before -> after fine-tuning:")
    for prompt, ref, b, a in list(zip(prompts, references, before, after, strict=True))[:samples]:
        question = prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
        print(
            f"  Q: {question}\n     reference: {ref}\n     before:    {b.strip()!r}\n     after:     "
            f"{a.strip()!r}{'  (exact)' if a.strip() == ref else ''}"
        )

    m = result.metrics
    exact_before = sum(b.strip() == r for b, r in zip(before, references, strict=True))
    exact_after = sum(a.strip() == r for a, r in zip(after, references, strict=True))
    sim_before = sum(map(char_similarity, before, references)) / len(references)
    sim_after = sum(map(char_similarity, after, references)) / len(references)
    print(
        f"\nTraining loss {m['train_loss_first']:.2f} -> {m['train_loss_last']:.2f}; "
        f"validation loss {m['eval_loss']:.2f}; test loss {m['test_loss']:.2f}\n"
        f"Test answers: exact {exact_before}/{len(references)} -> {exact_after}/{len(references)}, "
        f"character similarity {sim_before:.0%} -> {sim_after:.0%}\n"
        f"Adapter, metrics.json and loss_curves.png in {cfg.output.dir} "
        f"({time.monotonic() - started:.0f}s in all).\n"
        f"Next: edit {workdir / 'config.yaml'} or override settings, e.g.\n"
        f"  kubetune-train run {workdir / 'config.yaml'} --set training.learningRate=1e-3 "
        f"--set output.dir={workdir / 'run-2/output'} --set checkpoints.dir={workdir / 'run-2/checkpoints'}"
    )
    summary = {
        "exact_before": exact_before,
        "exact_after": exact_after,
        "similarity_before": sim_before,
        "similarity_after": sim_after,
        "test_questions": len(references),
    }
    (Path(cfg.output.dir) / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0
