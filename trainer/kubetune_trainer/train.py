"""The LoRA fine-tuning recipe: preflight, setup, train, evaluate, export.

Reads top to bottom in `run`. The loop is transformers' Trainer; kubetune adds
length-grouped batching that resumes exactly, atomic verified checkpoints with resume by
default, SIGTERM and divergence handling, progress sinks, early stopping with restore of
the best adapter, and the export.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from pydantic.alias_generators import to_camel
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from kubetune_trainer import checkpoints
from kubetune_trainer.checkpoints import Checkpoint
from kubetune_trainer.config import TrainConfig, total_steps, warmup_steps
from kubetune_trainer.contract import (
    ADAPTER_FILES,
    HIGH_LOSS_FILE,
    LOG_HISTORY_FILE,
    LOSS_CURVES_FILE,
    METRICS_FILE,
    PROGRESS_FILE,
)
from kubetune_trainer.data import EpochSeededSampler, PaddingCollator, PreparedData, file_signature
from kubetune_trainer.errors import (
    ConfigError,
    DivergedError,
    Interrupted,
    KubetuneError,
    OtherRunError,
    Stopped,
    StorageFullError,
    first_line,
    is_disk_full,
)
from kubetune_trainer.evaluate import EvalReport
from kubetune_trainer.evaluate import evaluate as evaluate_test
from kubetune_trainer.evaluate import write_report as write_eval_report
from kubetune_trainer.guards import DivergenceGuard, EvaluationAbandoned, RunControl, StopRequest
from kubetune_trainer.model import Hardware, apply_lora, load_model, parameter_counts
from kubetune_trainer.preflight import Preflight, checkpoint_bytes, publish, run_preflight
from kubetune_trainer.report import (
    HighLossSamples,
    ProgressTracker,
    drop_records_after,
    per_sample_loss,
    write_loss_curves,
)
from kubetune_trainer.sinks import Reporter, Sink, camel, default_sinks, finite_or_none

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)
    evaluation: EvalReport | None = None  # the test split, fine-tuned beside the base model


# --------------------------------------------------------------------------- pure decisions


def eval_interval(cfg: TrainConfig, steps: int) -> int:
    """Evaluate every evaluation.evalSteps steps, or ten times over the run by default."""
    return cfg.evaluation.eval_steps or max(1, steps // 10)


# Settings a resumed run takes from the config, not from the checkpoint: they change the optimisation
# from then on. Every other training setting is part of the run's identity.
RESUMABLE_TRAINING = frozenset(
    {
        "epochs",
        "max_steps",
        "learning_rate",
        "lr_scheduler",
        "warmup_ratio",
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "gradient_checkpointing",
        "logging_steps",
        "max_non_finite_steps",
    }
)


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint belongs to: model, adapter, data (settings and file contents), batching, seed,
    precision. Evaluation, checkpoint and output settings, and RESUMABLE_TRAINING, may change on resume."""
    files = [p for p in (cfg.dataset.path, cfg.dataset.validation_path, cfg.dataset.test_path) if p]
    return {
        "model": cfg.model.model_dump(mode="json", include={"name_or_path", "revision"}),
        "lora": cfg.lora.model_dump(mode="json"),
        "dataset": cfg.dataset.model_dump(mode="json", exclude={"prepared_dir"}),
        "data_files": [file_signature(p) if Path(p).is_file() else None for p in files],
        "training": cfg.training.model_dump(mode="json", exclude=set(RESUMABLE_TRAINING)),
    }


def trajectory(cfg: TrainConfig) -> dict[str, Any]:
    """The training settings that decide what a finished run produced."""
    keys = RESUMABLE_TRAINING - {"gradient_checkpointing", "logging_steps", "max_non_finite_steps"}
    return cfg.training.model_dump(mode="json", include=set(keys))


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def training_arguments(
    cfg: TrainConfig, *, precision: str, steps: int, has_validation: bool, evaluate_first: bool
) -> TrainingArguments:
    t, e = cfg.training, cfg.evaluation
    return TrainingArguments(
        output_dir=str(Path(cfg.checkpoints.dir) / checkpoints.STAGING),  # committed from there by on_save
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=e.batch_size or t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=warmup_steps(t, steps),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=t.seed,
        data_seed=t.seed,
        length_column_name="length",
        remove_unused_columns=False,  # the collator picks its fields; the sampler needs "length"
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_validation else "no",
        # Fresh: the curve starts at the untrained adapter. Resumed: the evaluation a stop interrupted.
        eval_on_start=has_validation and evaluate_first,
        eval_steps=eval_interval(cfg, steps) if has_validation else None,
        save_strategy="no",  # RunControl decides when to save; Trainer only writes
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=False,  # log a NaN as NaN; DivergenceGuard handles it
        dataloader_pin_memory=torch.cuda.is_available(),
    )


# --------------------------------------------------------------------------- Trainer and callbacks


class KubetuneTrainer(Trainer):
    """transformers' Trainer with the two seams it offers as methods filled in:
    the training sampler (resumable length grouping) and the loss (watched every step)."""

    def __init__(
        self,
        *args: Any,
        guard: DivergenceGuard,
        stop: StopRequest,
        sample_losses: HighLossSamples | None,
        group_by_length: bool,
        **kwargs: Any,
    ) -> None:
        self.guard = guard
        self.stop = stop
        self.sample_losses = sample_losses
        self.group_by_length = group_by_length
        super().__init__(*args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # A save is Trainer's write (here) and CheckpointCommitter's seal (on_save, right after):
        # together, what a SIGTERM waits for after the step.
        self.stop.save_begins()
        super()._save_checkpoint(model, trial)

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        grouped = self.group_by_length and self.args.length_column_name in dataset.column_names
        return EpochSeededSampler(
            len(dataset),
            seed=self.args.seed,
            lengths=list(dataset[self.args.length_column_name]) if grouped else None,
            batch_size=self.args.train_batch_size * self.args.gradient_accumulation_steps,
        )

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        index = inputs.pop("sample_index", None)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self.guard.observe(loss)
            if self.sample_losses is not None and index is not None:
                self.sample_losses.observe(index, per_sample_loss(outputs.logits.detach(), inputs["labels"]))
        return (loss, outputs) if return_outputs else loss


def is_improvement(loss: float, best: float, min_delta: float) -> bool:
    """A validation loss counts as better only if it beats the best by more than min_delta."""
    return loss < best - min_delta


class ValidationTracker(TrainerCallback):
    """Best validation loss and early stopping; asks for a checkpoint at every new best.

    transformers' EarlyStoppingCallback is not used: it ignores the evaluation at step 0 and
    expects load_best_model_at_end, which ties it to Trainer's own (non-atomic) checkpoints.
    The best adapter is restored from its checkpoint, so it survives a restart.
    """

    def __init__(self, patience: int | None = None, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best_loss = math.inf
        self.best_step: int | None = None
        self.bad_evaluations = 0
        self.last: tuple[int, float] | None = None
        self.saved_step = 0  # a step whose checkpoint already exists (the one a run resumed from)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **_: Any) -> None:
        loss = (metrics or {}).get("eval_loss")  # test-split evaluations report test_loss: not ours
        if loss is None:
            return
        self.last = (state.global_step, float(loss))
        if is_improvement(loss, self.best_loss, self.min_delta):
            self.best_loss, self.best_step, self.bad_evaluations = float(loss), state.global_step, 0
            if state.global_step > self.saved_step:
                control.should_save = True  # keep the best adapter on disk
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
            control.should_save = True

    def loss_at(self, step: int) -> float | None:
        return self.last[1] if self.last is not None and self.last[0] == step else None

    def state(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "bad_evaluations": self.bad_evaluations}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best_loss = float(state.get("best_loss", math.inf))
        self.best_step = state.get("best_step")
        self.bad_evaluations = int(state.get("bad_evaluations", 0))


class CheckpointCommitter(TrainerCallback):
    """Seals each checkpoint Trainer writes to staging, then prunes old ones."""

    def __init__(
        self,
        cfg: TrainConfig,
        existing: list[Checkpoint],
        tracker: ValidationTracker,
        stop: StopRequest,
        identity: dict[str, Any],
        reporter: Reporter,
    ) -> None:
        self.reporter = reporter
        self.root = Path(cfg.checkpoints.dir)
        self.keep = cfg.checkpoints.keep
        self.checkpoints = list(existing)
        self.tracker = tracker
        self.stop = stop
        self.identity = identity
        self.trajectory = trajectory(cfg)
        self.fingerprint = fingerprint(identity)

    @property
    def latest(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def on_save(self, args: Any, state: TrainerState, control: Any, model: Any = None, **_: Any) -> None:
        # Done: the last step, or early stopping (not a signal: SIGTERM stops "training" too).
        complete = state.global_step >= state.max_steps or (
            bool(control.should_training_stop) and not self.stop.requested
        )
        self.commit(state, model, complete=complete)

    def commit(self, state: TrainerState, model: Any, *, complete: bool, pending_eval: bool = False) -> None:
        step = state.global_step
        staging = self.root / checkpoints.STAGING / checkpoints.checkpoint_name(step)
        if model is not None and not trainable_weights_finite(model):
            checkpoints.set_aside(self.root, staging, "the trained weights are not finite")
            return
        checkpoint = checkpoints.commit(
            staging,
            self.root,
            step=step,
            epoch=float(state.epoch or 0.0),
            eval_loss=self.tracker.loss_at(step),
            fingerprint=self.fingerprint,
            state={
                "validation": self.tracker.state(),
                "complete": complete,
                "max_steps": state.max_steps,
                "pending_eval": pending_eval,
                "identity": self.identity,
                "trajectory": self.trajectory,
            },
        )
        self.checkpoints = [c for c in self.checkpoints if c.step != step] + [checkpoint]
        self.checkpoints = checkpoints.prune(self.checkpoints, self.keep, self.tracker.best_step)
        self.stop.save_ends()
        size = checkpoints.size_bytes(checkpoint.path)
        log.info("Saved %s, %.1f MB", checkpoints.describe(checkpoint), size / 1e6)
        best = next((c for c in self.checkpoints if c.step == self.tracker.best_step), None)
        self.reporter.checkpoint(
            {"latest": checkpoints.to_status(checkpoint), "best": checkpoints.to_status(best) if best else None}
        )


def trainable_weights_finite(model: torch.nn.Module) -> bool:
    weights = [p.detach() for p in model.parameters() if p.requires_grad]
    return not weights or all_finite(weights)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    return not bool(any_non_finite(tensors))


def any_non_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor, no device sync. The max-abs norm cannot overflow, unlike the 2-norm
    (the squares of weights near 1e20 already do), and NaN and inf propagate through it."""
    return ~torch.isfinite(torch.stack(torch._foreach_norm(tensors, ord=math.inf))).all()


# --------------------------------------------------------------------------- resume


def find_resume(cfg: TrainConfig, identity: dict[str, Any]) -> tuple[list[Checkpoint], Checkpoint | None]:
    """Complete checkpoints of this run, and the one to resume from; refuse another run's."""
    root = Path(cfg.checkpoints.dir)
    found = checkpoints.scan(root)
    if not found:
        return [], None
    if not cfg.checkpoints.resume:
        raise ConfigError(
            f"checkpoints.dir={root} holds {len(found)} checkpoint(s) but checkpoints.resume is false. Move them "
            "away or choose another checkpoints.dir; kubetune does not overwrite checkpoints."
        )
    newest = found[-1]
    if newest.fingerprint != fingerprint(identity):
        theirs = checkpoints.read_state(newest).get("identity", {})
        differ = sorted(k for k in identity if theirs.get(k) != identity[k]) or ["(unknown)"]
        what = ", ".join("data file contents" if k == "data_files" else f"{k} settings" for k in differ)
        raise OtherRunError(
            f"checkpoints.dir={root} holds checkpoints of a different run ({what} differ from {newest.name}). "
            "Use another checkpoints.dir for this config, or restore those settings to resume that run."
        )
    return found, newest


def finished_run(cfg: TrainConfig, resume: Checkpoint | None, steps: int) -> bool:
    """Whether `resume` ends training for this config (then the run only evaluates and exports).

    A finished run trained with other settings is refused: exporting its adapter under this config
    would misreport how it was made. More steps than it was trained for continue training it.
    """
    if resume is None:
        return False
    state = checkpoints.read_state(resume)
    if not state.get("complete") or steps > int(state.get("max_steps", 0)):
        return False
    theirs = state.get("trajectory", {})
    differ = sorted(to_camel(k) for k, v in trajectory(cfg).items() if theirs.get(k, v) != v)
    if differ:
        raise OtherRunError(
            f"checkpoints.dir={cfg.checkpoints.dir} holds a finished run trained with other "
            f"{', '.join('training.' + d for d in differ)}. Resuming would export that adapter under this config. "
            "Use another checkpoints.dir to train with these settings, or raise the steps to continue training it."
        )
    return True


# --------------------------------------------------------------------------- output


def check_output_dir(out: Path, cfg: TrainConfig) -> None:
    """Refuse a user's folder, and the adapter of a different run; the same run may export again (a rerun,
    or one with more steps: the settings in RESUMABLE_TRAINING may differ)."""
    checkpoints.claim_output_dir(out)
    for leftover in out.glob(".export-*"):  # an export of ours cut short by a kill
        shutil.rmtree(leftover, ignore_errors=True)
    if not (out / ADAPTER_FILES[1]).exists():
        return
    if _same_run(out / "config.yaml", cfg):
        return
    raise OtherRunError(
        f"output.dir: {out} already holds the adapter of another run (other model, LoRA, data or batch settings "
        "in its config.yaml). Choose another output.dir (--set output.dir=...) or move that run away first."
    )


def _same_run(previous: Path, cfg: TrainConfig) -> bool:
    from kubetune_trainer.config import load_config

    try:
        theirs = load_config(previous)
    except ConfigError:  # missing, or written by a version with other settings: not provably the same run
        return False
    return fingerprint(run_identity(theirs)) == fingerprint(run_identity(cfg))


def export(
    out: Path,
    model: Any,
    tokenizer: Any,
    cfg: TrainConfig,
    metrics: dict[str, Any],
    log_history: list[dict[str, Any]],
    *,
    evaluation: EvalReport | None = None,
    stop: StopRequest | None = None,
) -> None:
    """Write the adapter, tokenizer, config, metrics and curves; each file is replaced atomically.

    stop: a SIGTERM while the files move into place waits for the last move (a fraction of a
    second), so the output is never half this run's and half a previous one's."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        staging = Path(tmp)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        (staging / METRICS_FILE).write_text(_json(metrics, indent=2), encoding="utf-8")
        (staging / LOG_HISTORY_FILE).write_text(_json(log_history, indent=1), encoding="utf-8")
        title = f"{Path(cfg.model.name_or_path).name} LoRA"
        write_loss_curves(log_history, staging / LOSS_CURVES_FILE, title=title)
        if evaluation is not None:
            write_eval_report(evaluation, staging)
        mode = 0o666 & ~_umask()  # some writers use 0600; a serving pod may run as another user
        with stop.at_safe_points() if stop is not None else contextlib.nullcontext():
            for item in sorted(staging.iterdir()):
                target = out / item.name
                if item.is_dir():
                    if target.exists():
                        shutil.rmtree(target)
                else:
                    item.chmod(mode)
                os.replace(item, target)


def _json(value: Any, indent: int) -> str:
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False) + "\n"


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# --------------------------------------------------------------------------- the recipe


@dataclass
class Recipe:
    """Everything `setup` built. `train` runs it, `finish` evaluates and exports."""

    cfg: TrainConfig
    preflight: Preflight
    model: Any
    trainer: KubetuneTrainer
    tracker: ValidationTracker
    committer: CheckpointCommitter
    stop: StopRequest
    guard: DivergenceGuard
    resume_from: Checkpoint | None
    finished: bool  # resume_from ended training: evaluate and export only
    reporter: Reporter
    started: float
    progress: ProgressTracker

    @property
    def data(self) -> PreparedData:
        return self.preflight.data

    @property
    def tokenizer(self) -> Any:
        return self.preflight.tokenizer


def setup(
    cfg: TrainConfig, *, sinks: list[Sink] | None = None, expect_gpus: int = 0, stop: StopRequest | None = None
) -> Recipe:
    """Preflight, then the model with its adapter and the Trainer, ready to start or resume.

    sinks: where progress goes; by default the terminal, progress.jsonl, and Prometheus and the
    TrainingRun's status when configured (sinks.default_sinks). stop: the process's StopRequest
    (`run` installs one); a new, uninstalled one by default."""
    started = time.monotonic()
    log.info("Setting up: checkpoints, preflight checks, model")
    stop = stop if stop is not None else StopRequest(cfg.checkpoints.grace_seconds)
    out = Path(cfg.output.dir)
    check_output_dir(out, cfg)
    identity = run_identity(cfg)
    existing, resume_from = find_resume(cfg, identity)
    # Steps after the checkpoint (all of them, when there is none yet) run again: their records go.
    start_step = resume_from.step if resume_from is not None else 0
    for log_file in (out / PROGRESS_FILE, out / HIGH_LOSS_FILE):
        if dropped := drop_records_after(log_file, start_step):
            log.info("Dropped %d records after step %d from %s: those steps run again", dropped, start_step, log_file)

    hw = Hardware.detect()
    pf = run_preflight(cfg, hardware=hw, expect_gpus=expect_gpus, stage="run")
    publish(pf.report, out)
    reporter = Reporter(sinks if sinks is not None else default_sinks(cfg))
    try:
        reporter.preflight(pf.report.to_dict())  # a failed preflight shows in the run's status too
        pf.report.raise_if_failed()
        return _build(cfg, pf, hw, stop, reporter, existing, resume_from, identity, started)
    except BaseException:
        reporter.close()  # its threads and ports; on success `run` closes it after the export
        raise


def _build(
    cfg: TrainConfig,
    pf: Preflight,
    hw: Hardware,
    stop: StopRequest,
    reporter: Reporter,
    existing: list[Checkpoint],
    resume_from: Checkpoint | None,
    identity: dict[str, Any],
    started: float,
) -> Recipe:
    """The model with its adapter, the callbacks and the Trainer."""
    out = Path(cfg.output.dir)
    transformers.set_seed(cfg.training.seed)
    data = pf.data

    model = load_model(cfg.model, pf.precision, pf.attention)
    model = apply_lora(model, cfg.lora, cfg.training.gradient_checkpointing)
    trainable, total = parameter_counts(model)
    log.info("LoRA: %s trainable of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    steps = total_steps(cfg.training, len(data.train))
    finished = finished_run(cfg, resume_from, steps)
    has_validation = data.validation is not None
    resume_state = checkpoints.read_state(resume_from) if resume_from is not None else {}
    guard = DivergenceGuard(cfg.training.max_non_finite_steps, skip_update=pf.precision != "fp16")
    tracker = ValidationTracker(cfg.evaluation.early_stopping_patience, cfg.evaluation.early_stopping_min_delta)
    if resume_from is not None:
        tracker.load_state(resume_state.get("validation", {}))
        tracker.saved_step = resume_from.step
    committer = CheckpointCommitter(cfg, existing, tracker, stop, identity, reporter)
    samples = (
        HighLossSamples(cfg.evaluation.high_loss_samples, out / HIGH_LOSS_FILE, data.train, pf.tokenizer)
        if cfg.evaluation.high_loss_samples and has_validation
        else None
    )
    progress = ProgressTracker(
        reporter,
        samples_per_step=cfg.training.batch_size * cfg.training.gradient_accumulation_steps,
        non_finite_steps=lambda: guard.total,
    )
    callbacks: list[TrainerCallback] = [
        RunControl(stop, guard, cfg.checkpoints.every_steps, cfg.checkpoints.every_minutes),
        tracker,
        committer,
        progress,
    ]
    if samples is not None:
        callbacks.append(samples)
    trainer = KubetuneTrainer(
        model=model,
        args=training_arguments(
            cfg,
            precision=pf.precision,
            steps=steps,
            has_validation=has_validation,
            evaluate_first=resume_from is None or bool(resume_state.get("pending_eval")),
        ),
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=PaddingCollator(pf.tokenizer.pad_token_id, pad_to_multiple_of=8 if hw.cuda else None),
        processing_class=pf.tokenizer,
        callbacks=callbacks,
        guard=guard,
        stop=stop,
        sample_losses=samples,
        group_by_length=cfg.training.group_by_length,
    )
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    return Recipe(
        cfg, pf, model, trainer, tracker, committer, stop, guard, resume_from, finished, reporter, started, progress
    )


def train(recipe: Recipe) -> dict[str, float]:
    """Train (or resume) to the end; SIGTERM, divergence and a full disk end it with their own error.

    Only inside the training loop does a SIGTERM wait for a safe point (the end of a step) to save;
    anywhere else `Stopped` is raised at once (guards.StopRequest)."""
    trainer, stop, resume = recipe.trainer, recipe.stop, recipe.resume_from
    if recipe.finished:
        log.info("%s finished training; evaluating and exporting it", checkpoints.describe(resume))
        _load_checkpoint_weights(recipe.model, resume)
        trainer.state = TrainerState.load_from_json(str(resume.path / "trainer_state.json"))
        if checkpoints.read_state(resume).get("pending_eval") and recipe.data.validation is not None:
            # A SIGTERM cut the last evaluation short. Without it the tracker's best is an older step,
            # and finish() would export that adapter instead of this one. Trainer.evaluate logs it to
            # the history and hands it to the ValidationTracker (a callback), as during training.
            log.info("step %d: evaluating, as the interrupted run could not", resume.step)
            trainer.evaluate()
        return {}
    if resume is not None:
        log.info("Resuming from %s", checkpoints.describe(resume))
    with stop.at_safe_points():
        try:
            try:
                output = trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
            except EvaluationAbandoned:
                # Weights, optimizer and data position are those of the last finished step: save them, and
                # note that its evaluation is owed (the resumed run does it first).
                if trainer.state.global_step > 0 and recipe.guard.consecutive == 0:
                    trainer._save_checkpoint(trainer.model, trial=None)
                    state = trainer.state
                    recipe.committer.commit(
                        state, trainer.model, complete=state.global_step >= state.max_steps, pending_eval=True
                    )
                raise _interrupted(recipe) from None
        except KubetuneError:
            raise
        except Exception as exc:
            if is_disk_full(exc) or _save_failed_for_space(recipe):
                raise _disk_full(recipe, exc) from None
            raise
    if recipe.guard.diverged_at is not None:
        raise _diverged(recipe)
    if stop.requested:
        raise _interrupted(recipe)
    return output.metrics


def _interrupted(recipe: Recipe) -> Interrupted:
    latest = recipe.committer.latest
    where = f"; {checkpoints.describe(latest)} is the newest checkpoint" if latest else "; no checkpoint yet"
    return Interrupted.by(
        recipe.stop.signal, f"at step {recipe.trainer.state.global_step}{where}. Run again to resume."
    )


def _diverged(recipe: Recipe) -> DivergedError:
    cfg = recipe.cfg
    latest = recipe.committer.latest
    keep = f"The newest checkpoint, {checkpoints.describe(latest)}, is kept. " if latest else ""
    return DivergedError(
        f"Training diverged: the loss or gradients were not finite for {cfg.training.max_non_finite_steps} steps "
        f"in a row (at step {recipe.guard.diverged_at}). {keep}Lower training.learningRate (now "
        f"{cfg.training.learning_rate:g}), check the data, or use precision bf16/fp32 instead of fp16."
    )


def _save_failed_for_space(recipe: Recipe) -> bool:
    """After an error: was a checkpoint being written, and is the volume out of room for one?"""
    staging = Path(recipe.cfg.checkpoints.dir) / checkpoints.STAGING
    if not any(staging.glob(f"{checkpoints.PREFIX}*")):  # Trainer makes .staging itself at start
        return False
    latest = recipe.committer.latest
    if latest is not None:
        files = [f.stat().st_size for f in latest.path.rglob("*") if f.is_file()]
        need, largest = sum(files), max(files, default=0)
    else:  # no checkpoint yet: preflight's estimate of one
        info = recipe.preflight.model_info
        need = largest = checkpoint_bytes(info) if info is not None else 0
    # What the failed save wrote already takes its room: only the rest must fit (else a save that failed for
    # another reason, half-written on a half-full volume, would read as VolumeFull).
    need -= checkpoints.size_bytes(staging)
    return checkpoints.lacks_space(staging, max(need, 0), largest)


def _disk_full(recipe: Recipe, exc: BaseException) -> StorageFullError:
    root = Path(recipe.cfg.checkpoints.dir)
    staging = root / checkpoints.STAGING
    shutil.rmtree(staging, ignore_errors=True)  # our own half-written save: free its space
    free = shutil.disk_usage(root).free if root.exists() else 0
    latest = recipe.committer.latest
    intact = f"{checkpoints.describe(latest)} and older checkpoints are intact" if latest else "no checkpoint existed"
    return StorageFullError(
        f"checkpoints.dir={root}: the volume is full while saving step {recipe.trainer.state.global_step} "
        f"({first_line(exc, 160)}; {free / 2**20:,.0f} MiB free). {intact}. Free space, "
        "lower checkpoints.keep, or enlarge the volume, then run again to resume."
    )


def _load_checkpoint_weights(model: Any, checkpoint: Checkpoint) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(checkpoint.path / ADAPTER_FILES[1])))


def finish(recipe: Recipe, train_metrics: dict[str, float]) -> RunResult:
    """After training: restore the best adapter, take the final losses, export everything.

    Nothing here is worth a checkpoint: a SIGTERM stops it at once (exit 143), and the rerun finds
    the finished checkpoint and only evaluates and exports."""
    cfg, trainer, tracker, data = recipe.cfg, recipe.trainer, recipe.tracker, recipe.data
    history = list(trainer.state.log_history)
    final_step = trainer.state.global_step
    log.info("step %d: training done; final evaluation and export", final_step)

    restored_best = False
    if cfg.evaluation.load_best_at_end and tracker.best_step == 0 and final_step > 0:
        log.warning("The validation loss never improved on the untrained adapter; exporting the last one anyway")
    elif cfg.evaluation.load_best_at_end and tracker.best_step not in (None, 0, final_step):
        best = next((c for c in recipe.committer.checkpoints if c.step == tracker.best_step), None)
        if best is None:
            log.warning(
                "The checkpoint of the best evaluation (step %s) is gone; exporting the last adapter", tracker.best_step
            )
        else:
            _load_checkpoint_weights(recipe.model, best)
            restored_best = True
            log.info("Restored the adapter of %s", checkpoints.describe(best))

    final: dict[str, float] = {}
    if data.validation is not None:
        last = next((h for h in reversed(history) if "eval_loss" in h), None)
        if restored_best:
            final["eval_loss"] = tracker.best_loss
        elif last is not None and last.get("step") == final_step:
            final["eval_loss"] = last["eval_loss"]
        else:
            final.update(trainer.evaluate(data.validation))
    evaluation = None
    if data.test is not None:
        # The adapter against its base model, side by side, on the test split (evaluate.py).
        evaluation = evaluate_test(
            recipe.model,
            recipe.tokenizer,
            data,
            cfg,
            baseline=cfg.evaluation.baseline,
            on_progress=lambda *_: recipe.progress.heartbeat(trainer.state),  # generation can take many minutes
        )
        final["test_loss"] = evaluation.finetuned["loss"]
        for line in evaluation.summary_lines():
            log.info("%s", line)

    trainable, total = parameter_counts(recipe.model)
    train_losses = [h["loss"] for h in history if "loss" in h]
    runtime = train_metrics.get("train_runtime") or 0.0
    state = trainer.state
    pf = recipe.preflight
    metrics = {
        "global_step": final_step,
        "max_steps": state.max_steps,
        "epoch": round(float(state.epoch or 0.0), 4),
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "train_loss_mean": train_metrics.get("train_loss"),
        "eval_loss": final.get("eval_loss"),
        "test_loss": final.get("test_loss"),
        "best_eval_loss": None if tracker.best_step is None else tracker.best_loss,
        "best_step": tracker.best_step,
        "restored_best": restored_best,
        "early_stopped": final_step < state.max_steps,
        "resumed_from_step": recipe.resume_from.step if recipe.resume_from else None,
        "train_runtime_seconds": round(runtime, 3),
        "wall_seconds": round(time.monotonic() - recipe.started, 3),
        "train_tokens": int(state.num_input_tokens_seen),
        "tokens_per_second": round(
            (state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)) / runtime, 1
        )
        if runtime
        else None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "precision": pf.precision,
        "attention": pf.attention,
        "device": pf.hardware.device_name,
        "data": data.summary(),
        # What a SIGTERM waits for (compare with checkpoints.graceSeconds); this process's steps and saves.
        "longest_step_seconds": round(recipe.stop.longest_step, 3),
        "median_save_seconds": round(statistics.median(recipe.stop.save_seconds), 3)
        if recipe.stop.save_seconds
        else None,
    }
    out = Path(cfg.output.dir)
    export(out, recipe.model, recipe.tokenizer, cfg, metrics, history, evaluation=evaluation, stop=recipe.stop)
    log.info("Adapter and reports written to %s", out)
    recipe.reporter.evaluation(
        {**camel({k: metrics[k] for k in EVALUATION_FIELDS}), **(evaluation.status() if evaluation else {})}
    )
    return RunResult(out, metrics, history, evaluation)


EVALUATION_FIELDS = ("eval_loss", "test_loss", "best_eval_loss", "best_step", "restored_best", "early_stopped")


def run(cfg: TrainConfig, *, sinks: list[Sink] | None = None, expect_gpus: int = 0) -> RunResult:
    """Fine-tune cfg.model with LoRA on cfg.dataset and export the adapter to cfg.output.dir.

    SIGTERM and Ctrl-C are handled from here to the end (guards.StopRequest): inside the training
    loop they save a checkpoint first; anywhere else they stop at once. Either way: Interrupted."""
    stop = StopRequest(cfg.checkpoints.grace_seconds)
    stop.install()
    where = "while setting up, before training started; nothing new to save"
    try:
        with checkpoints.exclusive(Path(cfg.checkpoints.dir)):
            recipe = setup(cfg, sinks=sinks, expect_gpus=expect_gpus, stop=stop)
            try:
                after = (
                    "in the final evaluation and export; the finished run's checkpoint is kept, so a rerun only "
                    "evaluates and exports it"
                )
                where = after if recipe.finished else "before training started; nothing new to save"
                metrics = train(recipe)
                where = after
                return finish(recipe, metrics)
            finally:
                recipe.reporter.close()
    except Stopped as stopped:
        raise Interrupted.by(stopped.signal, f"{where}. Run again to continue.") from None
    finally:
        stop.uninstall()
