"""Progress records, and what else the run reports about itself.

`ProgressTracker` turns the Trainer's events into `Progress` records for the sinks
(sinks.py, which defines the record and imports no torch); `write_loss_curves` draws the
curves; `HighLossSamples` finds the training samples the model finds hardest.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetune_trainer.checkpoints import write_atomic
from kubetune_trainer.sinks import HEARTBEAT, Progress, Reporter, format_duration

log = logging.getLogger(__name__)


def estimate_eta(steps_done: int, steps_left: int, elapsed: float) -> float | None:
    """Seconds left at the mean pace of the steps this process has run."""
    if steps_done <= 0 or elapsed <= 0:
        return None
    return steps_left * elapsed / steps_done


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class ProgressTracker(TrainerCallback):
    """Builds a Progress record at each step and log/eval event and gives it to the sinks.

    non_finite_steps: how many optimizer steps were skipped so far for a non-finite loss (the
    divergence guard's count). A step that adds to it is an event ("nonfinite"): the guard may stop
    the run before the next logging step, and a NaN loss is null in JSON, so the count is what
    progress.jsonl, the status and the alerts see.

    heartbeat_seconds: during an evaluation, which makes no steps for minutes on a large split, a fresh
    record (its lastUpdateTime) at most this often, so the stall alert tells a busy run from a hung one.
    """

    def __init__(
        self,
        reporter: Reporter,
        samples_per_step: int,
        window: int = 20,
        *,
        non_finite_steps: Callable[[], int] | None = None,
        heartbeat_seconds: float = 5.0,
    ) -> None:
        self.reporter = reporter
        self.heartbeat_seconds = heartbeat_seconds
        self._last_emit = -math.inf
        self.samples_per_step = samples_per_step
        self.non_finite_steps = non_finite_steps
        self._non_finite_reported = 0
        self._window: deque[tuple[float, int, int]] = deque(maxlen=window)
        self._start: tuple[float, int] | None = None
        self.train_loss: float | None = None
        self.eval_loss: float | None = None
        self.learning_rate: float | None = None
        self.grad_norm: float | None = None
        self.last: Progress | None = None

    # -- Trainer events

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        now = time.monotonic()
        self._start = (now, state.global_step)
        self._window.append((now, state.global_step, state.num_input_tokens_seen))
        self._emit(state, "begin")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        self._window.append((time.monotonic(), state.global_step, state.num_input_tokens_seen))
        bad = self.non_finite_steps() if self.non_finite_steps is not None else 0
        self._emit(state, "nonfinite" if bad > self._non_finite_reported else None)
        self._non_finite_reported = bad

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None, **_: Any
    ) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.train_loss = float(logs["loss"])
            self.learning_rate = logs.get("learning_rate", self.learning_rate)
            self.grad_norm = logs.get("grad_norm", self.grad_norm)
            self._emit(state, "log")

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict | None = None,
        **_: Any,
    ) -> None:
        if metrics and "eval_loss" in metrics:
            self.eval_loss = float(metrics["eval_loss"])
            self._emit(state, "eval")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        self._emit(state, "end")

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self.heartbeat(state)

    def heartbeat(self, state: TrainerState) -> None:
        """A record now and then while no step is made (evaluations), not one per batch."""
        if time.monotonic() - self._last_emit >= self.heartbeat_seconds:
            self._emit(state, HEARTBEAT)

    # -- record

    def _emit(self, state: TrainerState, event: str | None) -> None:
        self._last_emit = time.monotonic()
        self.last = self.snapshot(state)
        self.reporter.progress(self.last, event)

    def snapshot(self, state: TrainerState) -> Progress:
        total = max(state.max_steps, 1)
        step = state.global_step
        now = time.monotonic()
        eta_s = None
        if self._start is not None:
            eta_s = estimate_eta(step - self._start[1], total - step, now - self._start[0])
        tokens_s = samples_s = None
        if len(self._window) >= 2:
            (t0, s0, k0), (t1, s1, k1) = self._window[0], self._window[-1]
            if t1 > t0:
                tokens_s = (k1 - k0) / (t1 - t0)
                samples_s = (s1 - s0) * self.samples_per_step / (t1 - t0)
        return Progress(
            step=step,
            total_steps=total,
            epoch=round(float(state.epoch or 0.0), 4),
            percent=round(100.0 * step / total, 2),
            eta_seconds=None if eta_s is None else round(eta_s, 1),
            eta=format_duration(eta_s) if step < total else "0s",
            train_loss=_round(self.train_loss, 4),  # what kubectl get shows: enough to see it move
            eval_loss=_round(self.eval_loss, 4),
            learning_rate=self.learning_rate,
            grad_norm=self.grad_norm,
            tokens_per_second=None if tokens_s is None else round(tokens_s, 1),
            samples_per_second=None if samples_s is None else round(samples_s, 2),
            tokens_seen=int(state.num_input_tokens_seen),
            samples_seen=step * self.samples_per_step,
            gpu_memory_peak_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            non_finite_steps=None if self.non_finite_steps is None else int(self.non_finite_steps()),
            last_update_time=utc_now(),
        )


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite a JSONL log without its records of steps after `step`, atomically; returns how many went.

    A run resumed from the checkpoint of `step` rolls back what came after it and makes those steps again,
    so their records from the interrupted attempt would stand twice, with other numbers, in the same log.
    """
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if (at := _step_of(line)) is None or at <= step]
    if len(kept) == len(lines):
        return 0
    write_atomic(path, "".join(kept))
    return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None  # a line cut short by a kill, or not a record: kept as it is
    return step if isinstance(step, int) else None


def write_loss_curves(log_history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Train and validation loss against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#1f77b4", linewidth=1.5)
    if evals:
        ax.plot(*zip(*evals, strict=True), label="validation loss", color="#d62728", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (cross-entropy, nats per target token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def token_losses(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy at each position, 0 where the label is ignored, shape [batch, length - 1].

    Computed in chunks of positions so the float32 temporaries stay near 128 MB whatever the
    vocabulary, and without a device sync (fixed chunk sizes, no nonzero()).
    """
    batch, length, vocab = logits.shape
    flat_logits = logits[:, :-1].reshape(-1, vocab)
    flat_labels = labels[:, 1:].reshape(-1)
    chunk = max(1, (1 << 25) // vocab)
    losses = torch.empty(flat_labels.shape[0], device=logits.device, dtype=torch.float32)
    for start in range(0, flat_labels.shape[0], chunk):
        end = start + chunk
        losses[start:end] = torch.nn.functional.cross_entropy(
            flat_logits[start:end].float(), flat_labels[start:end], ignore_index=ignore_index, reduction="none"
        )
    return losses.view(batch, length - 1)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample over its target tokens, shape [batch]."""
    mask = (labels[:, 1:] != ignore_index).float()
    return token_losses(logits, labels, ignore_index).sum(1) / mask.sum(1).clamp(min=1)


class HighLossSamples(TrainerCallback):
    """Collects per-sample training losses; after each validation, appends the worst k to a JSONL file.

    Losses come from the forward passes training already makes, so this costs no extra
    pass over the data; each line says which samples the model found hardest lately.
    """

    def __init__(self, k: int, path: Path, dataset: Any, tokenizer: Any) -> None:
        self.k = k
        self.path = path
        self.dataset = dataset
        self.tokenizer = tokenizer
        self._index: list[torch.Tensor] = []
        self._loss: list[torch.Tensor] = []
        self._position: dict[int, int] | None = None

    def observe(self, index: torch.Tensor, losses: torch.Tensor) -> None:
        self._index.append(index.detach())
        self._loss.append(losses.detach())

    def on_evaluate(
        self, args: Any, state: TrainerState, control: TrainerControl, metrics: dict | None = None, **_: Any
    ) -> None:
        if metrics and "eval_loss" in metrics and self._loss:
            self.write(state.global_step)

    def write(self, step: int) -> None:
        index = torch.cat(self._index).tolist()
        loss = torch.cat(self._loss).tolist()
        self._index, self._loss = [], []
        latest = dict(zip(index, loss, strict=True))  # a sample seen twice keeps its latest loss
        # A non-finite loss is the worst of all (and first to look at); JSON has no NaN, so it is written as null.
        worst = sorted(latest.items(), key=lambda item: -item[1] if math.isfinite(item[1]) else -math.inf)[: self.k]
        if self._position is None:
            self._position = {row: pos for pos, row in enumerate(self.dataset["index"])}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            for row, value in worst:
                ids = self.dataset[self._position[row]]["input_ids"]
                text = self.tokenizer.decode(ids, skip_special_tokens=False)
                loss_value = round(value, 5) if math.isfinite(value) else None
                record = {"step": step, "index": row, "loss": loss_value, "text": text}
                fh.write(json.dumps(record, allow_nan=False) + "\n")
