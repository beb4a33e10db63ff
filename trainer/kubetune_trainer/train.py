"""The LoRA fine-tuning recipe: setup, train, evaluate, export.

Reads top to bottom in `run`: each setup step returns what it built. The loop itself is
transformers' Trainer; kubetune adds its batching (length-grouped, padded per batch),
progress reporting, early stopping with restore of the best adapter, and the export.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState, PrinterCallback, ProgressCallback

from kubetune_trainer.config import TrainConfig, steps_per_epoch
from kubetune_trainer.data import PaddingCollator, PreparedData, prepare
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.model import (
    Hardware,
    apply_lora,
    load_model,
    load_tokenizer,
    parameter_counts,
    resolve_attention,
    resolve_precision,
)
from kubetune_trainer.report import ProgressTracker, Sink, TerminalSink, write_loss_curves

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class RunResult:
    output_dir: Path
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- pure decisions


def total_steps(cfg: TrainConfig, num_train_rows: int) -> int:
    if cfg.training.max_steps is not None:
        return cfg.training.max_steps
    return math.ceil(cfg.training.epochs * steps_per_epoch(num_train_rows, cfg.training))


def eval_interval(cfg: TrainConfig, steps: int) -> int:
    """Evaluate every evaluation.evalSteps steps, or ten times over the run by default."""
    return cfg.evaluation.eval_steps or max(1, steps // 10)


def training_arguments(cfg: TrainConfig, *, precision: str, steps: int, has_validation: bool) -> TrainingArguments:
    t, e = cfg.training, cfg.evaluation
    return TrainingArguments(
        output_dir=cfg.checkpoints.dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=e.batch_size or t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,  # the collator picks its fields; the sampler needs "length"
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_validation else "no",
        eval_on_start=has_validation,  # the curve starts at the untrained adapter
        eval_steps=eval_interval(cfg, steps) if has_validation else None,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def known_final_eval_loss(
    history: list[dict[str, Any]], final_step: int, best: ValidationTracker, restored_best: bool
) -> float | None:
    """The validation loss of the exported weights if an evaluation already measured it."""
    if restored_best:
        return best.best_loss
    last = next((h for h in reversed(history) if "eval_loss" in h), None)
    return last["eval_loss"] if last is not None and last.get("step") == final_step else None


# --------------------------------------------------------------------------- callbacks


def is_improvement(loss: float, best: float, min_delta: float) -> bool:
    """A validation loss counts as better only if it beats the best by more than min_delta."""
    return loss < best - min_delta


class ValidationTracker(TrainerCallback, ExportableState):
    """Best validation loss, early stopping, and a CPU copy of the best adapter.

    transformers' EarlyStoppingCallback is not used: it ignores the evaluation at step 0,
    and it expects load_best_model_at_end, which ties it to Trainer's own checkpoints.
    Only trainable weights (the adapter, megabytes) are copied.
    """

    def __init__(self, patience: int | None = None, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best_loss = math.inf
        self.best_step: int | None = None
        self.bad_evaluations = 0
        self._weights: dict[str, torch.Tensor] | None = None

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict | None = None, model: Any = None, **_: Any
    ) -> None:
        loss = (metrics or {}).get("eval_loss")  # test-split evaluations report test_loss: not ours
        if loss is None:
            return
        if is_improvement(loss, self.best_loss, self.min_delta):
            self.best_loss, self.best_step, self.bad_evaluations = float(loss), state.global_step, 0
            if model is not None:
                self._weights = {
                    n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
                }
            return
        self.bad_evaluations += 1
        if self.patience is not None and self.bad_evaluations >= self.patience:
            log.info(
                "Early stopping at step %d: no validation improvement over %.4f (step %d) in %d evaluations",
                state.global_step,
                self.best_loss,
                self.best_step,
                self.bad_evaluations,
            )
            control.should_training_stop = True

    def restore(self, model: torch.nn.Module) -> None:
        if self._weights is None:
            return
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self._weights:
                    param.copy_(self._weights[name])

    def state(self) -> dict[str, Any]:
        return {
            "args": {"patience": self.patience, "min_delta": self.min_delta},
            "attributes": {
                "best_loss": self.best_loss,
                "best_step": self.best_step,
                "bad_evaluations": self.bad_evaluations,
            },
        }


# --------------------------------------------------------------------------- output


def check_output_dir(out: Path, cfg: TrainConfig) -> None:
    """Refuse to overwrite the adapter of a different run; a rerun of the same config may."""
    if not (out / ADAPTER_FILES[1]).exists():
        return
    previous = out / "config.yaml"
    if previous.exists() and previous.read_text(encoding="utf-8") == cfg.to_yaml():
        return
    raise ConfigError(
        f"output.dir: {out} already holds the adapter of another run (its config.yaml differs from this "
        "one). Choose another output.dir (--set output.dir=...) or move that run away first."
    )


def export(
    out: Path,
    model: Any,
    tokenizer: Any,
    cfg: TrainConfig,
    metrics: dict[str, Any],
    log_history: list[dict[str, Any]],
) -> None:
    """Write the adapter, tokenizer, config, metrics and curves; each file is replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        staging = Path(tmp)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        (staging / "log_history.json").write_text(json.dumps(log_history, indent=1) + "\n", encoding="utf-8")
        write_loss_curves(log_history, staging / "loss_curves.png", title=f"{Path(cfg.model.name_or_path).name} LoRA")
        mode = 0o666 & ~_umask()  # some writers use 0600; a serving pod may run as another user
        for item in sorted(staging.iterdir()):
            target = out / item.name
            if item.is_dir():
                if target.exists():
                    shutil.rmtree(target)
            else:
                item.chmod(mode)
            os.replace(item, target)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# --------------------------------------------------------------------------- the recipe


@dataclass
class Recipe:
    """Everything `setup` built; `finish` turns a trained Recipe into exported results."""

    cfg: TrainConfig
    hardware: Hardware
    precision: str
    attention: str
    tokenizer: Any
    data: PreparedData
    model: Any
    trainer: Trainer
    best: ValidationTracker
    started: float


def setup(cfg: TrainConfig, *, sinks: list[Sink] | None = None) -> Recipe:
    """Load tokenizer, data and model, wrap the model with LoRA, and build the Trainer."""
    started = time.monotonic()
    check_output_dir(Path(cfg.output.dir), cfg)

    hw = Hardware.detect()
    precision = resolve_precision(cfg.training.precision, hw)
    attention = resolve_attention(cfg.model.attn_implementation, hw)
    transformers.set_seed(cfg.training.seed)
    log.info("Device %s, precision %s, attention %s", hw.device_name, precision, attention)

    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.dataset, tokenizer)
    log.info("Data (%s): %s", data.format, _split_summary(data))

    model = load_model(cfg.model, precision, attention)
    model = apply_lora(model, cfg.lora, cfg.training.gradient_checkpointing)
    trainable, total = parameter_counts(model)
    log.info("LoRA: %s trainable of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    steps = total_steps(cfg, len(data.train))
    has_validation = data.validation is not None
    best = ValidationTracker(cfg.evaluation.early_stopping_patience, cfg.evaluation.early_stopping_min_delta)
    callbacks: list[TrainerCallback] = [
        ProgressTracker(
            sinks if sinks is not None else [TerminalSink()],
            samples_per_step=cfg.training.batch_size * cfg.training.gradient_accumulation_steps,
        )
    ]
    if has_validation:
        callbacks.append(best)
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, precision=precision, steps=steps, has_validation=has_validation),
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if hw.cuda else None),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    return Recipe(cfg, hw, precision, attention, tokenizer, data, model, trainer, best, started)


def finish(recipe: Recipe, train_metrics: dict[str, float]) -> RunResult:
    """After training: restore the best adapter, take the final losses, export everything."""
    cfg, trainer, best, data = recipe.cfg, recipe.trainer, recipe.best, recipe.data
    history = list(trainer.state.log_history)
    final_step = trainer.state.global_step

    restored_best = False
    if cfg.evaluation.load_best_at_end and best.best_step is not None and best.best_step != final_step:
        best.restore(recipe.model)
        restored_best = True
        log.info("Restored the adapter of step %d (validation loss %.4f)", best.best_step, best.best_loss)

    final: dict[str, float] = {}
    if data.validation is not None:
        known = known_final_eval_loss(history, final_step, best, restored_best)
        final.update({"eval_loss": known} if known is not None else trainer.evaluate(data.validation))
    if data.test is not None:
        final.update(trainer.evaluate(data.test, metric_key_prefix="test"))

    trainable, total = parameter_counts(recipe.model)
    train_losses = [h["loss"] for h in history if "loss" in h]
    runtime = train_metrics.get("train_runtime") or 0.0
    state = trainer.state
    metrics = {
        "global_step": final_step,
        "max_steps": state.max_steps,
        "epoch": round(float(state.epoch or 0.0), 4),
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "train_loss_mean": train_metrics.get("train_loss"),
        "eval_loss": final.get("eval_loss"),
        "test_loss": final.get("test_loss"),
        "best_eval_loss": None if best.best_step is None else best.best_loss,
        "best_step": best.best_step,
        "restored_best": restored_best,
        "early_stopped": final_step < state.max_steps,
        "train_runtime_seconds": round(runtime, 3),
        "wall_seconds": round(time.monotonic() - recipe.started, 3),
        "train_tokens": int(state.num_input_tokens_seen),
        "tokens_per_second": round(state.num_input_tokens_seen / runtime, 1) if runtime else None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "precision": recipe.precision,
        "attention": recipe.attention,
        "device": recipe.hardware.device_name,
        "data": data.summary(),
    }
    out = Path(cfg.output.dir)
    export(out, recipe.model, recipe.tokenizer, cfg, metrics, history)
    log.info("Adapter and reports written to %s", out)
    return RunResult(out, metrics, history)


def run(cfg: TrainConfig, *, sinks: list[Sink] | None = None) -> RunResult:
    """Fine-tune cfg.model with LoRA on cfg.dataset and export the adapter to cfg.output.dir."""
    recipe = setup(cfg, sinks=sinks)
    train_output = recipe.trainer.train()
    return finish(recipe, train_output.metrics)


def _split_summary(data: PreparedData) -> str:
    parts = []
    for name, s in data.stats.items():
        extra = f", {s.truncated} truncated" if s.truncated else ""
        extra += f", {s.dropped} dropped" if s.dropped else ""
        parts.append(f"{name} {s.rows} rows / {s.tokens:,} tokens{extra}")
    return "; ".join(parts)
