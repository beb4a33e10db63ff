"""What may stop a run early, and the one place that decides what happens after a step.

- SIGTERM (preemption, eviction, Job suspension) or Ctrl-C: `StopRequest` records it; the run saves
  a checkpoint at the next step end (or abandons an evaluation in progress and saves),
  then exits 143 (130 for Ctrl-C). Outside the training loop it stops at once. A watchdog exits
  (75) anyway when the grace period runs out, so the kubelet never has to SIGKILL a process in
  the middle of a write.
- Non-finite loss: `DivergenceGuard` skips the optimizer step (the weights stay finite)
  and stops the run as Diverged after `training.maxNonFiniteSteps` in a row.
- `RunControl` combines these with the checkpoint schedule after every step; it runs
  after transformers' DefaultFlowCallback, so its word on save/evaluate/stop is final.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetune_trainer.errors import (
    GRACE_EXPIRED_EXIT_CODE,
    Interrupted,
    Stopped,
    StopTimedOut,
    report_failure,
)
from kubetune_trainer.errors import SIGNAL_EXIT_CODES as EXIT_CODES

log = logging.getLogger(__name__)


class EvaluationAbandoned(Exception):
    """Raised inside an evaluation loop to leave it at once after SIGTERM."""


def grace_shortfall(step_seconds: float, save_seconds: float, grace_seconds: float) -> str | None:
    """Pure: a warning when the slowest step plus the slowest save would not fit in the grace period.

    A SIGTERM that arrives as a step starts waits for that step and then for the save, so when
    the two take longer than checkpoints.graceSeconds every stop ends in the watchdog, without a
    checkpoint."""
    need = step_seconds + save_seconds
    if need <= grace_seconds:
        return None
    return (
        f"a training step ({step_seconds:.1f}s) plus a checkpoint save ({save_seconds:.1f}s) take longer than "
        f"checkpoints.graceSeconds={grace_seconds:g}s: a SIGTERM may end the run without a new checkpoint "
        f"(exit {GRACE_EXPIRED_EXIT_CODE}). Raise checkpoints.graceSeconds above {math.ceil(need * 1.5)} (and the "
        "pod's terminationGracePeriodSeconds above that), or make steps shorter (training.batchSize, "
        "training.gradientAccumulationSteps)."
    )


class StopRequest:
    """SIGTERM (or a first Ctrl-C) seen by this process, and a watchdog bounding how long we take to obey.

    Install it as early as the process starts: in a container the trainer is PID 1, and PID 1
    ignores a signal it has no handler for, so without one the kubelet's SIGTERM goes unheard
    until SIGKILL. Outside the training loop the handler raises `Stopped` at once (setup and the
    final evaluation hold nothing a rerun cannot redo). Inside it (`at_safe_points`) it only
    records the signal, and the loop saves a checkpoint at the next step end. Either way a
    watchdog ends the process with exit 75 when checkpoints.graceSeconds pass first.

    It also times steps and saves (what a stop waits for) and warns once when they do not fit.
    A second Ctrl-C interrupts at once, as a user at a terminal expects.
    """

    def __init__(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.signal: signal.Signals | None = None
        self.longest_step = 0.0
        self.save_seconds: list[float] = []  # each save: Trainer's write and kubetune's commit
        self._save_started: float | None = None
        self.saved_after_signal = False  # a checkpoint was committed after the signal: 143 holds
        self._warned = False
        self._defer = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, EXIT_CODES[signal.SIGTERM])

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not in some test runners)
        for signum in EXIT_CODES:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    @contextlib.contextmanager
    def at_safe_points(self) -> Iterator[None]:
        """Inside: a signal is only recorded; the code inside checks `requested` and stops at a safe point."""
        before, self._defer = self._defer, True
        try:
            yield
        finally:
            self._defer = before

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal = signal.Signals(signum)
        threading.Thread(target=self._watchdog, name="stop-watchdog", daemon=True).start()
        if self._defer:
            log.warning(
                "%s received: saving a checkpoint at the next safe point, then exiting %d (within %.0fs)",
                self.signal.name,
                self.exit_code,
                self.grace_seconds,
            )
            return
        log.warning(
            "%s received: stopping (exit %d); no training is under way, so nothing new to save",
            self.signal.name,
            self.exit_code,
        )
        raise Stopped(self.signal)

    def _watchdog(self) -> None:
        time.sleep(self.grace_seconds)
        if self.saved_after_signal:
            # Saved in time, but what followed (closing the sinks, a slow filesystem) ran past the grace period.
            os._exit(report_failure(Interrupted.by(self.signal, "after saving a checkpoint")))
        # The main thread is stuck in a long step or save; a checkpoint could not be made in time.
        why = grace_shortfall(self.longest_step, max(self.save_seconds, default=0.0), self.grace_seconds)
        message = (
            f"no safe point within checkpoints.graceSeconds={self.grace_seconds:g}s of "
            f"{self.signal.name if self.signal else 'the signal'}; exiting {GRACE_EXPIRED_EXIT_CODE} without a new "
            "checkpoint (the previous ones are intact; a rerun resumes from the newest)."
            + (f" On this machine {why}" if why else "")
        )
        os._exit(report_failure(StopTimedOut(message)))

    # -- what a stop waits for

    def note_step(self, seconds: float) -> None:
        self.longest_step = max(self.longest_step, seconds)
        self._check_budget()

    def save_begins(self) -> None:
        self._save_started = time.monotonic()

    def save_ends(self) -> None:
        if self.requested:
            self.saved_after_signal = True
        if self._save_started is not None:
            self.save_seconds.append(time.monotonic() - self._save_started)
            self._save_started = None
            self._check_budget()

    def _check_budget(self) -> None:
        if self._warned or not self.save_seconds:
            return
        why = grace_shortfall(self.longest_step, max(self.save_seconds), self.grace_seconds)
        if why:
            self._warned = True
            log.warning("On this machine %s", why)


class DivergenceGuard:
    """Counts consecutive optimizer steps whose loss or gradients were not finite and skips their update."""

    def __init__(self, limit: int, skip_update: bool) -> None:
        self.limit = limit
        # Under fp16 the GradScaler already skips steps with non-finite gradients.
        self.skip_update = skip_update
        self.consecutive = 0
        self.total = 0  # non-finite steps over this process's run, for the progress records and alerts
        self.diverged_at: int | None = None
        self._bad: torch.Tensor | None = None

    def observe(self, loss: torch.Tensor) -> None:
        """Called for every micro-batch; no device sync here."""
        bad = ~torch.isfinite(loss.detach())
        self._bad = bad if self._bad is None else self._bad | bad

    def check_step(self, model: torch.nn.Module | None, step: int) -> bool:
        """Before the optimizer step: True if the run diverged. One device sync per step."""
        flag = self._bad
        self._bad = None
        if self.skip_update and model is not None:
            # A finite loss can still give inf gradients (and inf weights after the update). Under
            # fp16 that is the GradScaler's business: its early overflows are expected.
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads:
                # Max-abs norms: a 2-norm overflows on large but finite gradients.
                norms_bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads, ord=math.inf))).all()
                flag = norms_bad if flag is None else flag | norms_bad.to(flag.device)
        bad = flag is not None and bool(flag.item())
        if not bad:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total += 1
        if self.skip_update and model is not None:
            for p in model.parameters():
                p.grad = None  # torch optimizers leave parameters without a gradient untouched
        log.warning(
            "step %d: loss or gradients not finite; optimizer step skipped (%d in a row, "
            "training.maxNonFiniteSteps=%d)",
            step,
            self.consecutive,
            self.limit,
        )
        if self.consecutive >= self.limit:
            self.diverged_at = step
            return True
        return False


def apply_current_settings(args: TrainingArguments, state: TrainerState, optimizer: Any, scheduler: Any) -> None:
    """On resume, Trainer restores the learning rate, weight decay and logging/eval intervals of
    the checkpoint; the config's current values are the ones the user asked for."""
    state.logging_steps = args.logging_steps
    if args.eval_steps:
        state.eval_steps = int(args.eval_steps)
    if optimizer is None or scheduler is None:
        return
    for group in optimizer.param_groups:
        group["initial_lr"] = args.learning_rate
        if group.get("weight_decay"):  # bias and norm groups keep their 0
            group["weight_decay"] = args.weight_decay
    scheduler.base_lrs = [args.learning_rate] * len(optimizer.param_groups)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas:  # the rate for the next step, from the current schedule
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, lambdas, strict=True):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


@dataclass(frozen=True)
class StepDecision:
    save: bool
    evaluate: bool
    stop: bool


def decide_after_step(
    *, diverged: bool, unhealthy: bool, stop_requested: bool, save_due: bool, default: StepDecision
) -> StepDecision:
    """Pure: what to do after an optimizer step, given Trainer's own plan (`default`).

    `unhealthy`: the last step's loss was not finite. Weights that just produced a NaN are
    not worth a checkpoint, so saving waits for a finite step (SIGTERM then resumes from
    the previous checkpoint). The end of training always saves, so a rerun knows it is done.
    """
    if diverged:
        return StepDecision(save=False, evaluate=False, stop=True)
    if stop_requested:
        # A due evaluation still starts (and is abandoned at its first batch, then saved): starting
        # it draws from the RNG, so skipping it would make the resumed run differ from an unbroken one.
        return StepDecision(save=not unhealthy, evaluate=default.evaluate, stop=True)
    save = (default.save or save_due or default.stop) and not unhealthy
    return StepDecision(save=save, evaluate=default.evaluate, stop=default.stop)


def checkpoint_due(
    *,
    step: int,
    last_save_step: int,
    last_save_time: float,
    now: float,
    every_steps: int | None,
    every_minutes: float | None,
) -> bool:
    """Pure: is a periodic checkpoint due after this step?"""
    if step <= last_save_step:
        return False
    if every_steps is not None and step % every_steps == 0:
        return True
    return every_minutes is not None and now - last_save_time >= every_minutes * 60


class RunControl(TrainerCallback):
    """After each step: divergence, SIGTERM and the checkpoint schedule decide save/evaluate/stop."""

    def __init__(
        self, stop: StopRequest, guard: DivergenceGuard, every_steps: int | None, every_minutes: float | None
    ) -> None:
        self.stop = stop
        self.guard = guard
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self.last_save_step = 0
        self.last_save_time = time.monotonic()
        self._evaluating = False
        self._training = False
        self._step_started: float | None = None
        self._steps_timed = 0

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **_: Any,
    ) -> None:
        self.last_save_step = state.global_step
        self.last_save_time = time.monotonic()
        self._training = True
        if state.global_step > 0:
            apply_current_settings(args, state, optimizer, lr_scheduler)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **_: Any
    ) -> None:
        if self.guard.check_step(model, state.global_step + 1):
            control.should_training_stop = True

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        self._step_started = time.monotonic()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        if self._step_started is not None:
            self._steps_timed += 1
            if self._steps_timed > 1:  # the first step of a process pays for warm-up (allocator, kernels)
                self.stop.note_step(time.monotonic() - self._step_started)
        decision = decide_after_step(
            diverged=self.guard.diverged_at is not None,
            unhealthy=self.guard.consecutive > 0,
            stop_requested=self.stop.requested,
            save_due=checkpoint_due(
                step=state.global_step,
                last_save_step=self.last_save_step,
                last_save_time=self.last_save_time,
                now=time.monotonic(),
                every_steps=self.every_steps,
                every_minutes=self.every_minutes,
            ),
            default=StepDecision(control.should_save, control.should_evaluate, control.should_training_stop),
        )
        control.should_save, control.should_evaluate = decision.save, decision.evaluate
        control.should_training_stop = decision.stop

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        self.last_save_step = state.global_step
        self.last_save_time = time.monotonic()

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if not self._evaluating and self._training:
            self._evaluating = True
            log.info("step %d: evaluating", state.global_step)
        if self.stop.requested:
            log.warning("SIGTERM during the evaluation at step %d: abandoning it to save", state.global_step)
            raise EvaluationAbandoned(f"SIGTERM during the evaluation at step {state.global_step}")

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        self._evaluating = False

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        self._training = False
