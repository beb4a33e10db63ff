"""`kubetune-train quickstart`: a whole LoRA run on a laptop CPU, no network, no GPU.

It writes a table of bank branches and turns it into question/answer pairs with `make-qa`
(the templates go to templates.yaml, for a user to edit), builds a tiny random-initialised
Qwen2 model and a BPE tokenizer trained on those pairs, fine-tunes through the same `run`
a TrainingRun uses, whose evaluation scores the base and the fine-tuned model side by side,
and prints their answers to held-out questions.

The base model knows nothing, so its embeddings and output head are trained in full
(`lora.modulesToSave`) beside the LoRA matrices: with a random base, LoRA alone cannot
learn a vocabulary in minutes. On a real pretrained model leave modulesToSave empty.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune_trainer.checkpoints import mark_dir, unmarked_files
from kubetune_trainer.config import TrainConfig
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.qa import SPLIT_FILES, MadeQA, QATemplate, make_qa

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
# Fewer leave a question type without a validation or test question (10% each); more have no distinct names.
BRANCHES = range(10, len(_STREETS) * len(_KINDS) + 1)


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


def quickstart_config(workdir: Path, max_steps: int, dataset: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {"nameOrPath": str(workdir / "base-model")},
        "dataset": {**dataset, "maxSeqLength": 64, "preparedDir": str(workdir / "prepared")},
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
    if unmarked_files(workdir, MARKER):
        raise ConfigError(
            f"--dir {workdir} exists and was not made by `kubetune-train quickstart`; choose another --dir."
        )
    if (workdir / MARKER).exists():
        print(
            f"Starting over in {workdir}/ (replacing the earlier quickstart's model, data, checkpoints and output, "
            "and writing config.yaml and templates.yaml afresh: run edited copies with `kubetune-train run`)"
        )
        for name in ("base-model", "prepared", "checkpoints", "output"):
            shutil.rmtree(workdir / name, ignore_errors=True)
    mark_dir(workdir, MARKER, "made by kubetune-train quickstart; rerunning it replaces this directory")


def write_templates(path: Path, templates: Sequence[QATemplate] = BRANCH_TEMPLATES) -> Path:
    """The question templates as a `make-qa --template` file, for a user to copy and edit."""
    import yaml

    body = {"templates": [dataclasses.asdict(t) for t in templates]}
    path.write_text(yaml.safe_dump(body, sort_keys=False, width=200), encoding="utf-8")
    return path


def prepare_workdir(workdir: Path, branches: int, max_steps: int) -> tuple[TrainConfig, MadeQA]:
    """Write the records, the QA pairs (through make-qa), the base model and the config."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    records = branch_records(branches)
    with (workdir / "branches.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    made = make_qa(workdir / "branches.csv", write_templates(workdir / "templates.yaml"), workdir / "qa", seed=0)
    pairs = [json.loads(line) for name in SPLIT_FILES.values() for line in (workdir / "qa" / name).open()]
    build_tiny_model([p["prompt"] + p["completion"] for p in pairs], workdir / "base-model")
    raw = quickstart_config(workdir, max_steps, made.dataset_config())
    (workdir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return TrainConfig.model_validate(raw), made


def main(workdir: Path, *, max_steps: int, branches: int, samples: int) -> int:
    from kubetune_trainer.train import run

    if branches not in BRANCHES:
        raise ConfigError(f"--branches {branches}: the quickstart makes {BRANCHES.start} to {BRANCHES.stop - 1}.")
    started = time.monotonic()
    claim_workdir(workdir)
    cfg, made = prepare_workdir(workdir, branches, max_steps)
    print(
        f"[1/3] {branches} branches -> {workdir / 'branches.csv'}; `make-qa` with {workdir / 'templates.yaml'}: "
        f"{made.describe()}"
    )
    print(
        f"[2/3] A random-initialised Qwen2 and a BPE tokenizer -> {cfg.model.name_or_path}; LoRA fine-tuning for "
        f"{max_steps} steps on CPU (config: {workdir / 'config.yaml'})"
    )
    result = run(cfg)
    report = result.evaluation
    assert report is not None and report.base is not None, "the quickstart's data has a test split"

    print("[3/3] Held-out test questions, the base model -> the fine-tuned one (both scored in eval.json):")
    for p in report.predictions[:samples]:
        question = p["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:")
        print(
            f"  Q: {question}\n     reference:  {p['reference'].strip()}\n     base:       {p['base_prediction']!r}\n"
            f"     fine-tuned: {p['prediction']!r}{'  (exact)' if p['exact'] else ''}"
        )
    m, base, tuned = result.metrics, report.base, report.finetuned
    print(
        f"\nTraining loss {m['train_loss_first']:.2f} -> {m['train_loss_last']:.2f}; validation loss "
        f"{m['eval_loss']:.2f}\n"
        f"Test split, base -> fine-tuned: loss {base['loss']:.2f} -> {tuned['loss']:.2f}, exact match "
        f"{base['exact_match']:.0%} -> {tuned['exact_match']:.0%}, character error rate {base['cer']:.2f} -> "
        f"{tuned['cer']:.2f} ({report.generated} questions)\n"
        f"Adapter, eval.json, predictions.jsonl, metrics.json and loss_curves.png in {cfg.output.dir} "
        f"({time.monotonic() - started:.0f}s in all).\n"
        f"Next: edit {workdir / 'config.yaml'} or override settings, then compare the runs, e.g.\n"
        f"  kubetune-train run {workdir / 'config.yaml'} --set training.learningRate=1e-3 "
        f"--set output.dir={workdir / 'run-2/output'} --set checkpoints.dir={workdir / 'run-2/checkpoints'}\n"
        f"  kubetune compare {cfg.output.dir} {workdir / 'run-2/output'}"
    )
    return 0
