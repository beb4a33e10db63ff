"""Evaluation of a run on its test split, beside the base model it started from.

Both models are scored the same way, in one process, on the same rows:

- loss and perplexity over every target token of the test split (the tokens training learns);
- for prompt/completion and chat data, greedy generations for the prompts (the conversation up
  to its last assistant turn), scored against the references by exact match, character and word
  error rate (jiwer), BLEU (sacrebleu) and ROUGE-L (rouge-score).

The base model is the same PeftModel with its adapter switched off (`disable_adapter`, which also
switches off `modulesToSave` copies), so no second copy of the weights is loaded.

`score_generations` and `compare` are pure; the rest runs models.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
import torch

from kubetune_trainer.checkpoints import OUTPUT_MARKER, mark_dir, unmarked_files, write_atomic
from kubetune_trainer.config import TrainConfig
from kubetune_trainer.contract import ADAPTER_FILES, EVAL_FILE, PREDICTIONS_FILE
from kubetune_trainer.data import IGNORE_INDEX, PaddingCollator, PreparedData
from kubetune_trainer.errors import ConfigError, DataError
from kubetune_trainer.report import token_losses
from kubetune_trainer.sinks import camel, finite_or_none

log = logging.getLogger(__name__)

# Every metric, in the order reports show them (loss and perplexity: lower is better; cer and wer too).
METRICS = ("loss", "perplexity", "exact_match", "cer", "wer", "bleu", "rouge_l")
# `evaluate(on_progress=...)` stages, in the order they run (the base ones only with a baseline).
STAGES = ("loss", "generation", "base loss", "base generation")
ProgressHook = Callable[[str, int, int], None]  # (stage, done, total), after every batch


# --------------------------------------------------------------------------- pure scoring


def normalize(text: str) -> str:
    """What the scores compare: the text with surrounding whitespace and repeated spaces removed."""
    return " ".join(text.split())


class WhitespaceTokenizer:
    """Words for ROUGE-L as exact match and WER see them: split on whitespace, case and script kept.

    rouge-score's default tokenizer lowercases and keeps only [a-z0-9], so two identical Cyrillic or
    CJK answers would score 0 and "Oak" would match "oak"."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return text.split()


def error_rate(references: Sequence[str], predictions: Sequence[str], *, unit: Literal["char", "word"]) -> float:
    """Corpus edit rate over characters (unit="char") or words (unit="word"): edits / reference length.

    jiwer (4.0 on) counts every character or word predicted for an empty reference as an insertion, so a
    non-empty answer where none was expected counts as errors. When every reference is empty the rate is
    0.0 if every prediction is empty too, else 1.0: there is no length to divide by, and the answers are wrong."""
    import jiwer

    if not references:
        return 0.0
    process = jiwer.process_characters if unit == "char" else jiwer.process_words
    out = process(list(references), list(predictions))
    errors = out.substitutions + out.deletions + out.insertions
    length = out.hits + out.substitutions + out.deletions
    if length == 0:
        return 0.0 if errors == 0 else 1.0
    return errors / length


def score_generations(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus-level scores of predictions against references, compared after `normalize` (case kept).

    exact_match: share of identical answers. cer / wer: edit distance over characters / words,
    summed over the corpus and divided by the reference length (0 is perfect; above 1 is possible);
    an empty reference counts every predicted character / word as an error (see `error_rate`).
    bleu: sacrebleu's corpus BLEU, 0-100, over the n-gram orders the predictions have (effective order):
    answers of one to three words have no 4-grams, and plain BLEU scores them 0 however right they are.
    rouge_l: mean ROUGE-L F1, 0-1, over whitespace-separated words with case kept (as WER counts them);
    an empty reference scores 1 for an empty answer and 0 for any other.
    """
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    if len(predictions) != len(references) or not references:
        raise ValueError(f"need as many predictions as references, and some: {len(predictions)} vs {len(references)}")
    preds = [normalize(p) for p in predictions]
    refs = [normalize(r) for r in references]
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=WhitespaceTokenizer())

    def rouge_l(r: str, p: str) -> float:
        if not r:  # rouge-score gives 0 whenever a side is empty, even for a right empty answer
            return float(not p)
        return scorer.score(r, p)["rougeL"].fmeasure

    return {
        "exact_match": sum(p == r for p, r in zip(preds, refs, strict=True)) / len(refs),
        "cer": error_rate(refs, preds, unit="char"),
        "wer": error_rate(refs, preds, unit="word"),
        "bleu": BLEU(effective_order=True).corpus_score(preds, [refs]).score,
        "rouge_l": sum(rouge_l(r, p) for r, p in zip(refs, preds, strict=True)) / len(refs),
    }


def compare(finetuned: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """finetuned - base for every metric both have."""
    return {k: finetuned[k] - base[k] for k in METRICS if k in finetuned and k in base}


def new_token_cap(reference_lengths: Sequence[int], limit: int) -> int:
    """Tokens to generate: enough for the longest reference with room to spare, at most `limit`.
    An answer much longer than every reference cannot score better, and generation is the slow part."""
    longest = max(reference_lengths, default=0)
    return max(1, min(limit, math.ceil(longest * 1.5) + 8))


# --------------------------------------------------------------------------- prompts


@dataclass
class GenerationTask:
    """Prompts to complete and the references to score them against, with their test-row index."""

    prompts: list[str]
    references: list[str]
    rows: list[int]
    add_special_tokens: bool  # False for chat prompts: the template already has its special tokens


def generation_task(data: PreparedData, cfg: TrainConfig, tokenizer: Any) -> GenerationTask | None:
    """The test rows to generate for (None for plain text data, which has no answer to score)."""
    rows = data.raw.get("test")
    if rows is None or data.format == "text":
        return None
    d = cfg.dataset
    limit = cfg.evaluation.max_generation_samples
    chosen = range(len(rows)) if limit is None else range(min(limit, len(rows)))
    prompts, references, kept = [], [], []
    for i in chosen:
        row = rows[i]
        if data.format == "prompt_completion":
            prompt, reference = row[d.prompt_field], row[d.completion_field]
        else:
            messages = row[d.messages_field]
            last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is None:
                continue  # nothing to answer in this conversation
            prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
            reference = messages[last]["content"]
        prompts.append(prompt)
        references.append(reference)
        kept.append(i)
    if not prompts:
        return None
    return GenerationTask(prompts, references, kept, add_special_tokens=data.format != "chat")


def stop_token_ids(model: Any, tokenizer: Any, chat: bool) -> list[int]:
    """EOS, the model's own end tokens, and for chat data the token that ends an assistant turn
    (ChatML's <|im_end|>, Llama 3's <|eot_id|>), found by rendering a one-turn conversation."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    if chat:
        marker = "kubetune-answer"
        convo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
        try:
            text = tokenizer.apply_chat_template(convo, tokenize=False)
        except jinja2.TemplateError:  # a template that refuses this probe: EOS must do
            text = ""
        after = text[text.find(marker) + len(marker) :] if marker in text else ""
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        first = tokenizer(after, add_special_tokens=False)["input_ids"][:1] if after.strip() else []
        ids.update(t for t in first if t in special)
    return sorted(i for i in ids if i is not None)


# --------------------------------------------------------------------------- running models


@torch.inference_mode()
def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    add_special_tokens: bool = True,
    stop_ids: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy completions of each prompt, decoded without the prompt.

    Prompts are batched in order of length with left padding, so a batch wastes little on
    padding; the answers come back in the prompts' order. `progress(done, total)` follows each batch."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so pad on the left
    device = next(model.parameters()).device
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]  # once, for all batches
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    eos = list(stop_ids) if stop_ids else tokenizer.eos_token_id
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            enc = tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, return_tensors="pt").to(device)
            generated = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,  # training turns the model's cache off; generation needs it to be fast
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
            texts = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(chunk, texts, strict=True):
                out[i] = text
            if progress is not None:
                progress(start + len(chunk), len(order))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


@torch.inference_mode()
def token_loss(
    model: Any, dataset: Any, pad_token_id: int, batch_size: int, progress: Callable[[int, int], None] | None = None
) -> tuple[float, int]:
    """Mean cross-entropy over every target token of a tokenized split, and the number of tokens.

    Summed per token, not averaged per batch, so the value does not depend on the batch size.
    `progress(done, total)` follows each batch, counting rows."""
    was_training = model.training
    model.eval()
    collate = PaddingCollator(pad_token_id)
    device = next(model.parameters()).device
    lengths = dataset["length"]
    order = sorted(range(len(dataset)), key=lambda i: lengths[i])  # little padding per batch
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    try:
        for start in range(0, len(order), batch_size):
            batch = collate([dataset[i] for i in order[start : start + batch_size]])
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # on the CPU: no device sync per batch
            total += token_losses(logits.logits, batch["labels"].to(device), IGNORE_INDEX).sum(dtype=torch.float64)
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    return (total.item() / count if count else math.nan), count


@dataclass
class EvalReport:
    """What `evaluate` measured; eval.json is `to_dict()`, predictions.jsonl is `predictions`."""

    split: str
    samples: int
    target_tokens: int
    generated: int
    max_new_tokens: int | None
    finetuned: dict[str, float]
    base: dict[str, float] | None
    seconds: float
    predictions: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def delta(self) -> dict[str, float] | None:
        return compare(self.finetuned, self.base) if self.base is not None else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("predictions")
        out["delta"] = self.delta
        return out

    def status(self) -> dict[str, Any]:
        """The TrainingRun's status.evaluation share of it: camelCase, no predictions."""
        return {
            "split": self.split,
            "samples": self.samples,
            "generated": self.generated,
            "test": camel(self.finetuned),
            "base": None if self.base is None else camel(self.base),
            "delta": None if self.delta is None else camel(self.delta),
        }

    def summary_lines(self, samples: int = 3) -> list[str]:
        """A few lines for the log: the metrics side by side, then some predictions."""
        lines = [f"Test split ({self.samples} samples, {self.generated} generated):"]
        for name, value in self.finetuned.items():
            if self.base is not None and name in self.base:
                lines.append(f"  {name:<12} base {self.base[name]:>9.4f}  ->  fine-tuned {value:>9.4f}")
            else:
                lines.append(f"  {name:<12} {value:.4f}")
        for p in self.predictions[:samples]:
            lines.append(f"  reference {normalize(p['reference'])!r}  prediction {p['prediction']!r}")
        return lines


def evaluate(
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    cfg: TrainConfig,
    *,
    baseline: bool,
    on_progress: ProgressHook | None = None,
) -> EvalReport:
    """Score `model` (a PeftModel) on the test split, and the base model too when `baseline`.

    `on_progress(stage, done, total)`, when given, is called after every loss batch and every
    generation batch; stage is one of STAGES, done counts test rows (loss) or prompts (generation)
    and reaches total at the end of each stage. It lets a caller show that a long final evaluation
    is alive; it runs on this thread between batches, so it must be quick."""
    require_test_split(data)
    started = time.monotonic()
    e = cfg.evaluation
    batch = e.batch_size or cfg.training.batch_size
    task = generation_task(data, cfg, tokenizer) if e.generate else None
    cap = None
    if task is not None:
        ref_tokens = tokenizer(task.references, add_special_tokens=False)["input_ids"]
        cap = new_token_cap([len(t) for t in ref_tokens], e.max_new_tokens)
        stops = stop_token_ids(model, tokenizer, chat=data.format == "chat")

    def hook(stage: str) -> Callable[[int, int], None] | None:
        return None if on_progress is None else (lambda done, total: on_progress(stage, done, total))

    def measure(prefix: str) -> tuple[dict[str, float], list[str] | None, int]:
        loss, tokens = token_loss(model, data.test, tokenizer.pad_token_id, batch, progress=hook(f"{prefix}loss"))
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
        predictions = None
        if task is not None:
            predictions = generate_completions(
                model,
                tokenizer,
                task.prompts,
                max_new_tokens=cap,
                batch_size=batch,
                add_special_tokens=task.add_special_tokens,
                stop_ids=stops,
                progress=hook(f"{prefix}generation"),
            )
            metrics.update(score_generations(predictions, task.references))
        return metrics, predictions, tokens

    tuned, tuned_predictions, tokens = measure("")
    base, base_predictions = None, None
    if baseline:
        with model.disable_adapter():  # the base model: the adapter and modulesToSave copies switched off
            base, base_predictions, _ = measure("base ")
    predictions = []
    if task is not None and tuned_predictions is not None:
        for k, row in enumerate(task.rows):
            record = {
                "row": row,
                "prompt": task.prompts[k],
                "reference": task.references[k],
                "prediction": normalize(tuned_predictions[k]),
                "exact": normalize(tuned_predictions[k]) == normalize(task.references[k]),
            }
            if base_predictions is not None:
                record["base_prediction"] = normalize(base_predictions[k])
            predictions.append(record)
    return EvalReport(
        split="test",
        samples=len(data.test),
        target_tokens=tokens,
        generated=len(task.prompts) if task is not None else 0,
        max_new_tokens=cap,
        finetuned=tuned,
        base=base,
        seconds=round(time.monotonic() - started, 3),
        predictions=predictions,
    )


def require_test_split(data: PreparedData) -> None:
    if data.test is None:
        raise DataError(
            "There is no test split to evaluate: set dataset.testSplit above 0 or give dataset.testPath.",
            check="dataset.test",
        )


def claim_eval_dir(out_dir: Path) -> None:
    """`eval --out`: refuse a file, or a folder of someone else's eval.json or predictions.jsonl (they would be
    replaced); mark the folder as kubetune's, so the next eval there may replace its own."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; give a directory for eval.json and predictions.jsonl.")
    theirs = unmarked_files(out_dir, OUTPUT_MARKER) & {EVAL_FILE, PREDICTIONS_FILE}
    if theirs:
        raise ConfigError(
            f"--out {out_dir} holds {' and '.join(sorted(theirs))} that kubetune did not write; eval would replace "
            "them. Give a new or empty directory, or move them away."
        )
    mark_dir(out_dir, OUTPUT_MARKER, "written by kubetune-train: its adapter, reports and logs")


def write_report(report: EvalReport, out_dir: Path) -> None:
    """eval.json and predictions.jsonl, each replaced atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    body = json.dumps(finite_or_none(report.to_dict()), indent=2, allow_nan=False) + "\n"
    write_atomic(out_dir / EVAL_FILE, body)
    write_atomic(
        out_dir / PREDICTIONS_FILE, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in report.predictions)
    )


# --------------------------------------------------------------------------- an adapter from disk


def same_model_name(a: str, b: str) -> bool:
    """Whether two model references name the same model: a hub id and a local copy agree by their last
    part ("Qwen/Qwen2.5-0.5B" and "/models/Qwen2.5-0.5B"), ignoring case as the hub does."""

    def name(ref: str) -> str:
        return ref.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()

    return name(a) == name(b)


def _natural(name: str) -> list[tuple[int, int, str]]:
    """Sort key: model.layers.2 before model.layers.10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def adapter_modules(keys: Iterable[str]) -> list[str]:
    """The modules that adapter weight keys belong to, as the base model names them:
    base_model.model.model.layers.2.mlp.down_proj.lora_A[.default].weight -> model.layers.2.mlp.down_proj."""
    modules = set()
    for key in keys:
        parts = key.removeprefix("base_model.model.").split(".")
        cut = next((i for i, p in enumerate(parts) if p.startswith("lora_") or p == "modules_to_save"), None)
        modules.add(".".join(parts[:cut] if cut is not None else parts[:-1]))
    return sorted(modules, key=_natural)


def _layer_pattern(name: str) -> tuple[str, str] | None:
    """model.layers.3.mlp.up_proj -> (model.layers, mlp.up_proj): the name without its layer number."""
    parts = name.split(".")
    i = next((k for k, p in enumerate(parts) if p.isdigit()), None)
    return None if i is None else (".".join(parts[:i]), ".".join(parts[i + 1 :]))


def uncovered_modules(module_names: Iterable[str], adapted: Iterable[str]) -> list[str]:
    """Modules that repeat an adapted one in another layer (the same name but the layer number) and have
    no adapter: the layers that an adapter of a shallower model, naming its modules by full path, leaves out
    of a deeper one. Loading such an adapter reports no missing key, as no adapter was made for them."""
    adapted = set(adapted)
    patterns = {_layer_pattern(n) for n in adapted} - {None}
    return sorted((n for n in module_names if n not in adapted and _layer_pattern(n) in patterns), key=_natural)


def _count(names: Sequence[str]) -> str:
    return f"{len(names)} module{'' if len(names) == 1 else 's'}"


def _some(names: Sequence[str], shown: int = 3) -> str:
    more = f", and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def fit_problems(
    missing_keys: Iterable[str], unexpected_keys: Iterable[str], uncovered: Iterable[str], model_name: str
) -> str | None:
    """What does not fit when an adapter's weights are loaded onto a model, in words (None when all fits):
    peft's unexpected keys (weights for modules the model lacks: an adapter of a deeper model, which peft
    drops), its missing keys and the `uncovered_modules` (modules the adapter has no weights for: an
    adapter of a shallower model, whose extra layers would stay unadapted or randomly adapted)."""
    unexpected = adapter_modules(unexpected_keys)
    missing = sorted(set(adapter_modules(missing_keys)) | set(uncovered), key=_natural)
    problems = []
    if unexpected:
        problems.append(f"the adapter has weights for {_count(unexpected)} {model_name} lacks ({_some(unexpected)})")
    if missing:
        problems.append(f"{model_name} has {_count(missing)} the adapter has no weights for ({_some(missing)})")
    return "; ".join(problems) or None


def adapter_base_name(adapter_dir: Path) -> str | None:
    """The base model an exported adapter names, after checking its files are there (cheap: before any
    model is loaded); a ConfigError names what is missing."""
    config_file = adapter_dir / ADAPTER_FILES[0]
    if not config_file.is_file():
        raise ConfigError(
            f"--adapter {adapter_dir}: no adapter_config.json there. Point it at a run's output.dir "
            "(where adapter_model.safetensors is), or leave --adapter out to use this config's output.dir."
        )
    try:
        trained_on = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"--adapter {adapter_dir}: adapter_config.json is unreadable ({exc}).") from None
    weights = [adapter_dir / f for f in (ADAPTER_FILES[1], "adapter_model.bin")]  # .bin: older peft
    if not any(w.is_file() for w in weights):
        # peft would look for the weights on the Hugging Face Hub instead, and fail there.
        raise ConfigError(
            f"--adapter {adapter_dir}: adapter_config.json but no adapter_model.safetensors. Copy the whole "
            "output.dir of the run, or point --adapter at it."
        )
    return trained_on


def load_adapter(base: Any, adapter_dir: Path, cfg: TrainConfig) -> Any:
    """The exported adapter on the base model, or a ConfigError that says what does not match.

    Every weight must fit: a shape mismatch (another width), weights for modules the base lacks
    (a deeper model) and modules without weights (a shallower model) are all refused; peft
    itself only warns about the last and drops the second silently."""
    from peft import PeftConfig, get_peft_model

    trained_on = adapter_base_name(adapter_dir)
    name = cfg.model.name_or_path
    remedy = "Evaluate it with the config of the run that made it, or set model.nameOrPath to its base model."
    try:
        # PeftModel.from_pretrained, in its two steps, for peft's load result (missing and unexpected keys).
        peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    except (TypeError, ValueError, OSError) as exc:  # a setting of the wrong type or name
        raise ConfigError(f"--adapter {adapter_dir}: adapter_config.json is not a peft config ({exc}).") from None
    try:
        peft_config.inference_mode = True
        with warnings.catch_warnings():  # peft's note on another base name: checked below, and logged
            warnings.filterwarnings("ignore", message=r"The PEFT config's `base_model_name_or_path` was renamed")
            model = get_peft_model(base, peft_config)
        loaded = model.load_adapter(str(adapter_dir), adapter_name="default")
    except TypeError as exc:  # a setting of the wrong type, found when peft builds the adapter (r: "8")
        raise ConfigError(f"--adapter {adapter_dir}: adapter_config.json is not a peft config ({exc}).") from None
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise ConfigError(
            f"--adapter {adapter_dir} does not fit model.nameOrPath={name}: it was trained on "
            f"{trained_on or 'another model'} ({detail[:300]}). {remedy}"
        ) from None
    uncovered = []
    # Layers left out on purpose (layers_to_transform, exclude_modules, a regex) are no mismatch.
    chosen_layers = getattr(peft_config, "layers_to_transform", None) or getattr(peft_config, "exclude_modules", None)
    targets = getattr(peft_config, "target_modules", None)
    regex = isinstance(targets, str) and targets != "all-linear"
    if not chosen_layers and not regex:
        modules = [n.removeprefix("base_model.model.") for n, _ in model.named_modules()]
        uncovered = uncovered_modules(modules, adapter_modules(n for n, _ in model.named_parameters() if ".lora_" in n))
    problem = fit_problems(loaded.missing_keys, loaded.unexpected_keys, uncovered, f"model.nameOrPath={name}")
    if problem is not None:
        raise ConfigError(
            f"--adapter {adapter_dir} does not fit model.nameOrPath={name}: it was trained on "
            f"{trained_on or 'another model'}, and {problem}. {remedy}"
        )
    if trained_on and not same_model_name(trained_on, name):
        log.warning(
            "--adapter %s was trained on %s, not model.nameOrPath=%s; its weights fit, so it is evaluated on %s. "
            "If that is not its base model, set model.nameOrPath to the model it was trained on.",
            adapter_dir,
            trained_on,
            name,
            name,
        )
    return model


def run_eval(cfg: TrainConfig, adapter_dir: Path | None = None, out_dir: Path | None = None) -> EvalReport:
    """`kubetune-train eval`: the run's test-split evaluation for an exported adapter (default: output.dir),
    written beside it (or to out_dir)."""
    from kubetune_trainer.data import prepare_or_load
    from kubetune_trainer.model import Hardware, load_model, load_tokenizer, resolve_attention, resolve_precision

    adapter_dir = adapter_dir or Path(cfg.output.dir)
    adapter_base_name(adapter_dir)
    if out_dir is not None:
        claim_eval_dir(out_dir)
    hw = Hardware.detect()
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_or_load(cfg.dataset, tokenizer)
    require_test_split(data)
    precision = resolve_precision(cfg.training.precision, hw)
    base = load_model(cfg.model, precision, resolve_attention(cfg.model.attn_implementation, hw))
    model = load_adapter(base.to("cuda" if hw.cuda else "cpu"), adapter_dir, cfg)
    report = evaluate(model, tokenizer, data, cfg, baseline=cfg.evaluation.baseline)
    write_report(report, out_dir or adapter_dir)
    for line in report.summary_lines():
        log.info("%s", line)
    return report
