"""Preemption, crashes and full disks, with real processes and real signals.

Every interrupted run is resumed by running the same command again, and must end with
the same per-step training losses as an uninterrupted run of the same config.
"""

from __future__ import annotations

import json
import os
import queue
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from kubetune_trainer import checkpoints
from tests.conftest import write_jsonl

STEPS = 40
GRACE_SECONDS = 25  # checkpoints.graceSeconds by default: a SIGTERM must be obeyed within it

# kubetune-train, except that every save pauses just before its manifest (where a kill hurts most),
# after writing the step to the file named by $PAUSE_MARKER. Fault injection from outside the product.
PAUSE_IN_SAVE = """
import os, sys, threading
from pathlib import Path
from kubetune_trainer import checkpoints, cli

def paused(staging, manifest):
    Path(os.environ["PAUSE_MARKER"]).write_text(str(manifest["step"]))
    threading.Event().wait(300)  # until the test kills or signals this process
    raise SystemExit("nobody came to kill this process")

checkpoints.write_manifest = paused
sys.exit(cli.main())
"""


class Trainer:
    """`kubetune-train run` as a child process whose log lines can be waited for.

    script: a Python file to run instead of kubetune-train (it takes the same arguments);
    prefix: a command that runs it (e.g. `unshare` to make it PID 1)."""

    def __init__(
        self, config: Path, env: dict | None = None, preexec=None, script: Path | None = None, prefix=()
    ) -> None:
        cli = Path(sys.executable).with_name("kubetune-train")
        command = [str(cli)] if cli.exists() else [sys.executable, "-m", "kubetune_trainer.cli"]
        if script is not None:
            command = [sys.executable, str(script)]
        self.signalled: float | None = None
        self.proc = subprocess.Popen(
            [*prefix, *command, "run", str(config)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            preexec_fn=preexec,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"exited before {pattern!r}:\n{''.join(self.lines[-40:])}")
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{''.join(self.lines[-40:])}")

    def send(self, sig: signal.Signals, pid: int | None = None) -> None:
        self.signalled = time.monotonic()
        os.kill(pid or self.proc.pid, sig)

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        self.obeyed_in = None if self.signalled is None else time.monotonic() - self.signalled
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return rc, "".join(self.lines)

    def stop(self, sig: signal.Signals = signal.SIGTERM, code: int = 143, pid: int | None = None) -> str:
        """Send sig; expect exit `code` within the grace period; return the log."""
        self.send(sig, pid)
        rc, log = self.finish()
        assert rc == code, log[-3000:]
        assert self.obeyed_in < GRACE_SECONDS, f"took {self.obeyed_in:.1f}s to obey {sig.name}"
        assert "Traceback" not in log
        return log


def run_to_end(config: Path, **kwargs) -> str:
    rc, log = Trainer(config, **kwargs).finish()
    assert rc == 0, log[-4000:]
    return log


def interrupt(config: Path, at: str, sig: signal.Signals = signal.SIGTERM, code: int = 143) -> tuple[int, str]:
    """Run until a log line matches `at`, send `sig`, expect exit `code`; return the step it stopped at."""
    trainer = Trainer(config)
    trainer.wait_for(at)
    log = trainer.stop(sig, code)
    return int(re.search(rf"Stopped by {sig.name} at step (\d+)", log).group(1)), log


def pause_in_save(tmp_path: Path) -> tuple[Path, Path]:
    """The PAUSE_IN_SAVE script and the marker it writes when a save is paused."""
    script = tmp_path / "pause_in_save.py"
    script.write_text(PAUSE_IN_SAVE)
    return script, tmp_path / "paused"


def wait_for_file(path: Path, trainer: Trainer, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline and trainer.proc.poll() is None, "the save never paused"
        time.sleep(0.05)


def losses(out: Path, key: str = "loss") -> dict[int, float]:
    history = json.loads((out / "log_history.json").read_text())
    return {h["step"]: h[key] for h in history if key in h}


def assert_same_losses(out: Path, reference: dict[str, dict[int, float]]) -> None:
    """Every step's training loss, and every evaluation, as in the run that was never interrupted."""
    for key, expected in reference.items():
        got = losses(out, key)
        assert sorted(got) == sorted(expected), key
        steps = sorted(expected)
        torch.testing.assert_close(torch.tensor([got[s] for s in steps]), torch.tensor([expected[s] for s in steps]))


@pytest.fixture(scope="module")
def run_files(tmp_path_factory, tiny_model, qa_rows):
    """Data and a config template: 4 epochs, dropout on (RNG matters), long evaluations."""
    from kubetune_trainer.qa import render_pairs
    from kubetune_trainer.quickstart import BRANCH_TEMPLATES, branch_records

    root = tmp_path_factory.mktemp("resume")
    train = write_jsonl(root / "train.jsonl", qa_rows)
    # 300 validation rows evaluated one at a time: an evaluation lasts long enough to be interrupted.
    validation = write_jsonl(root / "validation.jsonl", render_pairs(branch_records(75, seed=9), BRANCH_TEMPLATES))

    def config(name: str, **overrides) -> Path:
        work = root / name
        raw = {
            "model": {"nameOrPath": str(tiny_model)},
            "dataset": {
                "path": str(train),
                "validationPath": str(validation),
                "testSplit": 0,
                "maxSeqLength": 64,
                "preparedDir": str(work / "prepared"),
            },
            "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
            "training": {"maxSteps": STEPS, "batchSize": 8, "learningRate": 3e-3, "loggingSteps": 1},
            "evaluation": {"evalSteps": 10, "batchSize": 1, "highLossSamples": 0},
            "checkpoints": {"dir": str(work / "checkpoints"), "keep": 5},
            "output": {"dir": str(work / "output")},
        }
        for key, value in overrides.items():
            section, field = key.split(".")
            raw[section][field] = value
        work.mkdir()
        (work / "run.yaml").write_text(yaml.safe_dump(raw))
        return work / "run.yaml"

    return config


@pytest.fixture(scope="module")
def reference_output(run_files) -> Path:
    """The output of the run that is never interrupted."""
    config = run_files("reference")
    run_to_end(config)
    return config.parent / "output"


@pytest.fixture(scope="module")
def reference(reference_output) -> dict[str, dict[int, float]]:
    out = reference_output
    reference = {"loss": losses(out), "eval_loss": losses(out, "eval_loss")}
    assert sorted(reference["loss"]) == list(range(1, STEPS + 1))
    assert sorted(reference["eval_loss"]) == [0, 10, 20, 30, 40]
    return reference


def assert_same_result(out: Path, reference_output: Path) -> None:
    """What the export says about the final adapter, as in the run that was never interrupted."""
    got, expected = (json.loads((o / "metrics.json").read_text()) for o in (out, reference_output))
    for key in ("global_step", "best_step", "restored_best", "early_stopped"):
        assert got[key] == expected[key], key
    for key in ("eval_loss", "best_eval_loss"):
        torch.testing.assert_close(got[key], expected[key], msg=key)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_mid_training_saves_exits_and_resumes_exactly(run_files, reference, sig, code):
    config = run_files(f"signal-{sig.name}")
    stopped, _ = interrupt(config, r"step 1[3-6]/40 \(", sig, code)  # inside the second epoch
    assert 13 <= stopped < STEPS
    assert (config.parent / "checkpoints" / f"checkpoint-{stopped}" / "manifest.json").is_file()

    log = run_to_end(config)
    assert f"Resuming from checkpoint-{stopped} (step {stopped}" in log
    assert_same_losses(config.parent / "output", reference)


def test_sigterm_during_evaluation_abandons_it_saves_and_resumes_exactly(run_files, reference):
    config = run_files("sigterm-eval")
    stopped, log = interrupt(config, r"step 20: evaluating")
    assert stopped == 20
    assert "SIGTERM during the evaluation at step 20" in log
    assert "Saved checkpoint-20" in log

    log = run_to_end(config)
    assert "Resuming from checkpoint-20 (step 20" in log
    assert_same_losses(config.parent / "output", reference)


def test_kill_9_in_the_middle_of_a_save_leaves_the_previous_checkpoint_usable(run_files, reference, tmp_path):
    config = run_files("kill-9")
    ckpt = config.parent / "checkpoints"
    stopped, _ = interrupt(config, r"step 1[3-6]/40 \(")

    script, marker = pause_in_save(tmp_path)
    second = Trainer(config, env={"PAUSE_MARKER": str(marker)}, script=script)
    wait_for_file(marker, second)  # paused after the files are written, before the manifest
    second.proc.kill()
    second.finish()
    half_written = ckpt / checkpoints.STAGING / f"checkpoint-{marker.read_text()}"
    assert (half_written / "adapter_model.safetensors").exists()
    assert not (half_written / "manifest.json").exists()

    log = run_to_end(config)
    assert "an interrupted save left it in .staging" in log
    assert f"Resuming from checkpoint-{stopped} (step {stopped}" in log
    (aside,) = (ckpt / checkpoints.SET_ASIDE).iterdir()
    assert (aside / "adapter_model.safetensors").exists(), "set aside, not deleted"
    assert_same_losses(config.parent / "output", reference)


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(run_files):
    config = run_files("kill-early", **{"checkpoints.everySteps": 30})
    first = Trainer(config)
    first.wait_for(r"step (9|1[0-5])/40 \(")
    first.proc.kill()  # no grace: no checkpoint
    first.finish()
    assert not list((config.parent / "checkpoints").glob("checkpoint-*"))

    log = run_to_end(config)
    assert re.search(r"Dropped \d+ records after step 0 from \S+/progress.jsonl: those steps run again", log)
    records = [json.loads(line) for line in (config.parent / "output" / "progress.jsonl").open()]
    logged = [r["step"] for r in records if r["event"] == "log"]
    assert logged == sorted(set(logged)) and logged[-1] == STEPS


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_one_before_is_used(run_files, reference):
    config = run_files("corrupt", **{"checkpoints.everySteps": 10, "evaluation.highLossSamples": 2})
    stopped, _ = interrupt(config, r"step 2[3-6]/40 \(")
    newest = config.parent / "checkpoints" / f"checkpoint-{stopped}" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated weights

    log = run_to_end(config)
    assert "adapter_model.safetensors is 1000 bytes" in log
    assert "Resuming from checkpoint-20 (step 20" in log
    out = config.parent / "output"
    assert_same_losses(out, reference)
    # Steps 21.. ran twice; the logs keep only the run that made the adapter, each step once.
    assert re.search(r"Dropped \d+ records after step 20 from \S+/progress.jsonl: those steps run again", log)
    records = [json.loads(line) for line in (out / "progress.jsonl").open()]
    logged = [r["step"] for r in records if r["event"] == "log"]
    assert logged == sorted(set(logged)) and logged[-1] == STEPS
    worst = [json.loads(line)["step"] for line in (out / "high_loss_samples.jsonl").open()]
    assert worst == [step for step in (10, 20, 30, 40) for _ in range(2)]


def _checkpoint_bytes(run_files) -> int:
    probe = run_files("probe-size", **{"training.maxSteps": 1, "training.warmupRatio": 0})
    run_to_end(probe)
    (ckpt,) = checkpoints.scan(probe.parent / "checkpoints")
    return checkpoints.size_bytes(ckpt.path)


def test_a_full_volume_fails_clearly_and_keeps_earlier_checkpoints(run_files, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; test_file_size_limit covers the same path")
    size = _checkpoint_bytes(run_files)
    mount = tmp_path / "small-volume"
    mount.mkdir()
    # Room for two or three checkpoints (keep: 5 prunes nothing), not for the eight of the run.
    kib = int(size * 3.5) // 1024
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mount)], check=False).returncode:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        config = run_files("disk-full", **{"checkpoints.everySteps": 5})
        cfg = yaml.safe_load(config.read_text())
        cfg["checkpoints"]["dir"] = str(mount)
        config.write_text(yaml.safe_dump(cfg))
        rc, log = Trainer(config).finish()
        assert rc == 5, log[-3000:]
        assert f"checkpoints.dir={mount}: the volume is full while saving step" in log
        assert "Traceback" not in log
        kept = checkpoints.scan(mount)
        assert 2 <= len(kept) <= 3
        assert f"{kept[-1].name} (step {kept[-1].step}" in log
        assert "and older checkpoints are intact" in log
        assert not (mount / checkpoints.STAGING).exists(), "the half-written save is cleaned up"
        assert not (mount / checkpoints.SET_ASIDE).exists()
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_file_size_limit_while_saving_fails_clearly(run_files):
    """The same failure through RLIMIT_FSIZE (EFBIG), which needs no privileges."""
    # The prepared data is saved by the first run and loaded by the second, which then writes
    # nothing large before its checkpoint.
    config = run_files("fsize", **{"dataset.preparedDir": "PREPARED"})
    cfg = yaml.safe_load(config.read_text())
    cfg["dataset"]["preparedDir"] = str(config.parent / "prepared")
    config.write_text(yaml.safe_dump(cfg))
    interrupt(config, r"step 1[3-6]/40 \(")
    (earlier,) = [c for c in checkpoints.scan(config.parent / "checkpoints") if c.step > 10]
    optimizer = (earlier.path / "optimizer.pt").stat().st_size

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (optimizer // 2, optimizer // 2))

    rc, log = Trainer(config, preexec=limit_file_size).finish()
    assert rc == 5, log[-3000:]
    assert "Using the prepared data in" in log
    assert "the volume is full while saving step 20" in log
    assert f"{earlier.name} (step {earlier.step}" in log
    assert checkpoints.verify(earlier.path)[0] is not None


def test_non_finite_loss_exits_4_and_keeps_the_last_good_checkpoint(run_files):
    config = run_files("nan", **{"training.learningRate": 1e30, "checkpoints.everySteps": 1})
    rc, log = Trainer(config).finish()
    assert rc == 4, log[-3000:]
    assert "Training diverged: the loss or gradients were not finite for 3 steps in a row" in log
    assert "Lower training.learningRate (now 1e+30)" in log
    first_bad = int(re.search(r"step (\d+): loss or gradients not finite", log).group(1))
    kept = checkpoints.scan(config.parent / "checkpoints")
    # A checkpoint is saved after every finite step and never after a non-finite one.
    assert [c.step for c in kept] == list(range(1, first_bad))
    assert not (config.parent / "output" / "adapter_model.safetensors").exists()


def test_a_rerun_after_completion_only_exports(run_files, reference):
    config = run_files("rerun", **{"training.maxSteps": 12})
    run_to_end(config)
    first = (config.parent / "output" / "metrics.json").read_text()
    log = run_to_end(config)
    assert "finished training; evaluating and exporting it" in log
    assert "step 1/" not in log, "no step is trained twice"
    assert (
        json.loads(first)["eval_loss"]
        == json.loads((config.parent / "output" / "metrics.json").read_text())["eval_loss"]
    )


def test_no_safe_point_within_the_grace_period_exits_75_without_a_new_checkpoint(run_files, tmp_path):
    config = run_files("grace", **{"checkpoints.graceSeconds": 1})
    script, marker = pause_in_save(tmp_path)
    termination_log = tmp_path / "termination-log"
    trainer = Trainer(
        config, env={"PAUSE_MARKER": str(marker), "KUBETUNE_TERMINATION_LOG": str(termination_log)}, script=script
    )
    wait_for_file(marker, trainer)  # the main thread is now stuck inside a save
    trainer.send(signal.SIGTERM)
    rc, log = trainer.finish()
    # Not 143, which promises a checkpoint saved: a rerun resumes from the previous one, as after a crash.
    assert rc == 75, log[-3000:]
    assert "no safe point within checkpoints.graceSeconds=1s of SIGTERM; exiting 75 without a new checkpoint" in log
    assert 1 <= trainer.obeyed_in < GRACE_SECONDS
    assert json.loads(termination_log.read_text())["reason"] == "StopTimedOut"
    assert checkpoints.scan(config.parent / "checkpoints") == [], "the unfinished save is set aside, not used"


def test_sigterm_in_the_final_evaluation_leaves_a_finished_run(run_files, reference, reference_output):
    config = run_files("final-eval")
    stopped, log = interrupt(config, r"step 40: evaluating")
    assert stopped == 40
    state = checkpoints.read_state(checkpoints.scan(config.parent / "checkpoints")[-1])
    assert state["complete"] and state["pending_eval"]

    # The rerun owes step 40's evaluation. A SIGTERM there (outside the training loop) stops at
    # once and keeps the finished checkpoint.
    rerun = Trainer(config)
    rerun.wait_for(r"step 40: evaluating, as the interrupted run could not")
    log = rerun.stop()
    assert "Stopped by SIGTERM in the final evaluation and export" in log
    assert rerun.obeyed_in < 10, "no checkpoint to wait for"
    assert not (config.parent / "output" / "metrics.json").exists()

    log = run_to_end(config)
    assert "finished training; evaluating and exporting it" in log
    assert not re.search(r"step 41/", log)
    # The owed evaluation decides the best adapter just as the uninterrupted run's did.
    assert_same_losses(config.parent / "output", reference)
    assert_same_result(config.parent / "output", reference_output)


def _child_of(pid: int, timeout: float = 30) -> int:
    """The pid of pid's child (the process `unshare --fork` starts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                return int(stat.parent.name)
        time.sleep(0.05)
    raise AssertionError(f"no child of {pid}")


def _pid1_prefix() -> list[str]:
    if os.geteuid() != 0 or subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], check=False).returncode:
        pytest.skip("unshare -p (a new PID namespace) needs root; the plain case covers the handler")
    return ["unshare", "-p", "-f", "--mount-proc"]


@pytest.mark.parametrize("pid1", [False, True], ids=["process", "PID 1 as in a container"])
def test_sigterm_during_setup_stops_at_once(run_files, pid1):
    """Before training there is nothing to save: exit 143 at once. As PID 1 (the trainer in its container),
    a process with no handler ignores SIGTERM and would run on until the kubelet's SIGKILL."""
    prefix = _pid1_prefix() if pid1 else []
    config = run_files(f"setup-{'pid1' if pid1 else 'process'}")
    trainer = Trainer(config, prefix=prefix)
    trainer.wait_for(r"Setting up: checkpoints, preflight checks, model")
    log = trainer.stop(pid=_child_of(trainer.proc.pid) if pid1 else None)
    assert "Stopped by SIGTERM while setting up, before training started" in log
    assert trainer.obeyed_in < 10
    assert checkpoints.scan(config.parent / "checkpoints") == []


def test_a_resumed_run_uses_the_changed_settings(run_files, reference):
    config = run_files("changed")
    stopped, _ = interrupt(config, r"step 1[3-6]/40 \(")
    cfg = yaml.safe_load(config.read_text())
    cfg["training"].update({"learningRate": 1e-5, "loggingSteps": 3})
    cfg["evaluation"]["evalSteps"] = 7
    config.write_text(yaml.safe_dump(cfg))
    run_to_end(config)
    history = json.loads((config.parent / "output" / "log_history.json").read_text())
    after = [h for h in history if h["step"] > stopped]
    assert {h["step"] % 3 for h in after if "loss" in h} == {0}
    assert {h["step"] % 7 for h in after if "eval_loss" in h} <= {0, 40 % 7}  # and the final step
    rates = [h["learning_rate"] for h in after if "learning_rate" in h]
    assert max(rates) <= 1e-5, "the schedule now peaks at the new learning rate"


def test_weights_that_overflow_are_never_checkpointed(run_files):
    # lr 1e39 overflows float32 in the first update while that step's loss is still finite.
    config = run_files(
        "overflow", **{"training.learningRate": 1e39, "training.warmupRatio": 0, "checkpoints.everySteps": 1}
    )
    rc, log = Trainer(config).finish()
    assert rc == 4, log[-3000:]
    assert "The newest checkpoint" not in log
    assert checkpoints.scan(config.parent / "checkpoints") == []
    reasons = [p.read_text() for p in (config.parent / "checkpoints" / checkpoints.SET_ASIDE).glob("*/SET_ASIDE_*")]
    assert reasons
    assert all("not finite" in r for r in reasons)
