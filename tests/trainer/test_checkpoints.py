"""The checkpoint store and the decisions around it, without training."""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kubetune_trainer import checkpoints
from kubetune_trainer.checkpoints import Checkpoint, commit, scan, select_prunable, verify
from kubetune_trainer.data import EpochSeededSampler
from kubetune_trainer.guards import DivergenceGuard, StepDecision, checkpoint_due, decide_after_step, grace_shortfall
from kubetune_trainer.report import HighLossSamples, per_sample_loss


def stage(root: Path, step: int, payload: bytes = b"weights") -> Path:
    staging = root / checkpoints.STAGING / checkpoints.checkpoint_name(step)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "adapter_model.safetensors").write_bytes(payload * 100)
    (staging / "optimizer.pt").write_bytes(b"adam" * 50)
    return staging


def save(root: Path, step: int, eval_loss: float | None = None) -> Checkpoint:
    return commit(
        stage(root, step), root, step=step, epoch=step / 10, eval_loss=eval_loss, fingerprint="f", state={"x": 1}
    )


def test_commit_writes_a_manifest_and_renames_into_place(tmp_path):
    c = save(tmp_path, 7, eval_loss=1.5)
    assert c.path == tmp_path / "checkpoint-7"
    assert not (tmp_path / checkpoints.STAGING).exists()
    manifest = json.loads((c.path / "manifest.json").read_text())
    assert manifest["step"] == 7
    assert manifest["eval_loss"] == 1.5
    assert set(manifest["files"]) == {"adapter_model.safetensors", "optimizer.pt", "kubetune_state.json"}
    assert manifest["files"]["optimizer.pt"]["size"] == 200
    assert verify(c.path)[0] == c


def edit_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    for key, value in changes.items():
        if value is ...:
            manifest.pop(key)
        else:
            manifest[key] = value
    (path / "manifest.json").write_text(json.dumps(manifest))


def edit_entry(path: Path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"].update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json is not valid JSON"),
        (lambda p: (p / "manifest.json").write_text("[]"), "manifest.json is invalid: (top level): Input should be"),
        # Every field with the wrong type is damage like any other, caught before it is used.
        (lambda p: edit_manifest(p, files={"x": 1}), "manifest.json is invalid: files.x: Input should be"),
        (lambda p: edit_manifest(p, files=[]), "manifest.json is invalid: files: Input should be an object"),
        (lambda p: edit_manifest(p, epoch="x"), "manifest.json is invalid: epoch: Input should be a valid number"),
        (lambda p: edit_manifest(p, eval_loss="x"), "manifest.json is invalid: eval_loss: Input should be"),
        (lambda p: edit_manifest(p, step="10"), "manifest.json is invalid: step: Input should be a valid integer"),
        (lambda p: edit_manifest(p, step=True), "manifest.json is invalid: step: Input should be a valid integer"),
        (lambda p: edit_manifest(p, step=...), "manifest.json is invalid: step: Field required"),
        (lambda p: edit_manifest(p, fingerprint=None), "manifest.json is invalid: fingerprint: Input should be"),
        (lambda p: edit_manifest(p, format=2), "manifest.json is invalid: format: Input should be 1"),
        (lambda p: edit_entry(p, size="200"), "files.optimizer.pt.size: Input should be a valid integer"),
        (lambda p: edit_entry(p, sha256="abc"), "files.optimizer.pt.sha256: String should match pattern"),
        (lambda p: edit_manifest(p, step=11), "manifest.json says step 11, the folder's name says 10"),
        (lambda p: (p / "optimizer.pt").unlink(), "missing file(s): optimizer.pt"),
        (lambda p: (p / "extra.bin").write_bytes(b"?"), "not in the manifest: extra.bin"),
        (
            lambda p: (p / "adapter_model.safetensors").write_bytes(b"weights" * 10),
            "adapter_model.safetensors is 70 bytes, the manifest says 700",
        ),
        (
            lambda p: (p / "optimizer.pt").write_bytes(b"ADAM" * 50),  # same size, other bytes
            "optimizer.pt does not match its sha256",
        ),
    ],
)
def test_damaged_checkpoints_are_set_aside_with_the_reason(tmp_path, damage, reason):
    older = save(tmp_path, 5)
    newer = save(tmp_path, 10)
    damage(newer.path)
    assert scan(tmp_path) == [older]
    (aside,) = (tmp_path / checkpoints.SET_ASIDE).iterdir()
    assert aside.name.startswith("checkpoint-10-")
    assert reason in (aside / "SET_ASIDE_REASON.txt").read_text()
    assert (aside / "optimizer.pt").exists() or "optimizer.pt" in reason, "set aside, not deleted"


def test_a_valid_manifest_reads_back_with_its_types(tmp_path):
    c = save(tmp_path, 10, eval_loss=1.25)
    edit_manifest(c.path, epoch=2, added_by_a_newer_writer={"x": 1})  # an integer epoch is a number
    (back,) = scan(tmp_path)
    assert (back.step, back.epoch, back.eval_loss) == (10, 2.0, 1.25)
    assert checkpoints.describe(back) == "checkpoint-10 (step 10, epoch 2.00, eval loss 1.2500)"


def test_a_non_finite_eval_loss_is_stored_as_null(tmp_path):
    c = save(tmp_path, 3, eval_loss=float("nan"))
    assert json.loads((c.path / "manifest.json").read_text())["eval_loss"] is None  # strict JSON
    assert scan(tmp_path)[0].eval_loss is None


def test_an_interrupted_save_in_staging_is_set_aside(tmp_path):
    good = save(tmp_path, 5)
    stage(tmp_path, 10)  # Trainer wrote it, commit never ran
    assert scan(tmp_path) == [good]
    assert not (tmp_path / checkpoints.STAGING).exists()
    (aside,) = (tmp_path / checkpoints.SET_ASIDE).iterdir()
    assert "interrupted save" in (aside / "SET_ASIDE_REASON.txt").read_text()


def test_an_incomplete_staged_save_and_a_bad_checkpoint_of_the_same_step_are_both_set_aside(tmp_path):
    good = save(tmp_path, 5)
    bad = save(tmp_path, 10)
    (bad.path / "optimizer.pt").unlink()
    stage(tmp_path, 10)  # and an interrupted save of step 10 again, in the same scan (the same second)
    assert scan(tmp_path) == [good]
    aside = sorted((tmp_path / checkpoints.SET_ASIDE).iterdir())
    assert len(aside) == 2, "two names, no clash"
    reasons = sorted((a / checkpoints.REASON).read_text() for a in aside)
    assert "interrupted save" in reasons[0]
    assert "missing file(s): optimizer.pt" in reasons[1]


def test_a_kill_between_the_note_and_the_move_leaves_the_note_and_the_next_scan_finishes(tmp_path, monkeypatch):
    good = save(tmp_path, 5)
    bad = save(tmp_path, 10)
    (bad.path / "optimizer.pt").write_bytes(b"x")
    real_replace = os.replace

    def killed(*args):
        raise SystemExit("killed")  # as if the process died before the rename

    monkeypatch.setattr(checkpoints.os, "replace", killed)
    with pytest.raises(SystemExit):
        scan(tmp_path)
    assert "optimizer.pt is 1 bytes" in (bad.path / checkpoints.REASON).read_text(), "the note is written first"
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)
    assert scan(tmp_path) == [good]
    (aside,) = (tmp_path / checkpoints.SET_ASIDE).iterdir()
    first, *_ = (aside / checkpoints.REASON).read_text().splitlines()
    assert "optimizer.pt is 1 bytes" in first, "the first reason stays first"


def test_a_kill_while_deleting_a_replaced_checkpoint_leaves_a_name_scan_finishes_deleting(tmp_path, monkeypatch):
    save(tmp_path, 5)

    def killed(path, *args, **kwargs):
        raise SystemExit("killed")

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed)
    with pytest.raises(SystemExit):
        commit(stage(tmp_path, 5, b"new"), tmp_path, step=5, epoch=0.5, eval_loss=None, fingerprint="f", state={})
    monkeypatch.undo()
    assert not list(tmp_path.glob(".replaced-*")), "not a name scan would try to recover"
    assert list(tmp_path.glob(".deleting-*"))
    (again,) = scan(tmp_path)
    assert (again.path / "adapter_model.safetensors").read_bytes() == b"new" * 100
    assert not list(tmp_path.glob(".deleting-*"))
    assert not (tmp_path / checkpoints.SET_ASIDE).exists()


def test_a_new_checkpoints_dir_is_made_durable(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(checkpoints, "fsync_path", lambda p: synced.append(p))
    checkpoints.make_dirs(tmp_path / "a" / "b" / "checkpoints")
    assert (tmp_path / "a" / "b" / "checkpoints").is_dir()
    assert synced == [tmp_path, tmp_path / "a", tmp_path / "a" / "b"], "each new directory's parent"
    synced.clear()
    checkpoints.make_dirs(tmp_path / "a" / "b" / "checkpoints")
    assert synced == []


@pytest.mark.parametrize(
    ("free", "fsize_limit", "need", "largest", "lacks"),
    [
        (10 << 30, resource.RLIM_INFINITY, 50 << 20, 20 << 20, False),
        (40 << 20, resource.RLIM_INFINITY, 50 << 20, 20 << 20, True),  # the volume is full
        (10 << 30, 10 << 20, 50 << 20, 20 << 20, True),  # ulimit -f: the largest file cannot be written
        (10 << 30, 30 << 20, 50 << 20, 20 << 20, False),
    ],
)
def test_lacks_space_asks_the_volume_without_writing_a_checkpoints_worth(
    tmp_path, monkeypatch, free, fsize_limit, need, largest, lacks
):
    monkeypatch.setattr(checkpoints.os, "statvfs", lambda _: SimpleNamespace(f_bavail=free // 4096, f_frsize=4096))
    monkeypatch.setattr(checkpoints.resource, "getrlimit", lambda _: (fsize_limit, resource.RLIM_INFINITY))
    written = []
    real_open = Path.open

    def recording_open(self, mode="r", *args, **kwargs):
        fh = real_open(self, mode, *args, **kwargs)
        if "w" in mode:
            write = fh.write
            fh.write = lambda data: written.append(len(data)) or write(data)
        return fh

    monkeypatch.setattr(Path, "open", recording_open)
    assert checkpoints.lacks_space(tmp_path, need, largest) is lacks
    assert sum(written) <= 1 << 20, "a small probe, not a checkpoint's worth of zeros"
    assert list(tmp_path.iterdir()) == []


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save(tmp_path, 5)
    again = commit(stage(tmp_path, 5, b"other"), tmp_path, step=5, epoch=0.5, eval_loss=None, fingerprint="f", state={})
    assert scan(tmp_path) == [again]
    assert (again.path / "adapter_model.safetensors").read_bytes() == b"other" * 100


def ck(step: int, loss: float | None = None) -> Checkpoint:
    return Checkpoint(Path(f"/c/checkpoint-{step}"), step, 0.0, loss, "f")


@pytest.mark.parametrize(
    ("saved", "keep", "pruned"),
    [
        ([ck(1), ck(2), ck(3)], 2, [1]),
        ([ck(1, 0.5), ck(2, 0.9), ck(3, 0.8), ck(4)], 2, [2]),  # step 1 is the best: kept
        ([ck(1, 0.9), ck(2, 0.5), ck(3), ck(4)], 1, [1, 3]),
        ([ck(1), ck(2)], 5, []),
    ],
)
def test_prune_keeps_the_newest_and_the_best(saved, keep, pruned):
    best = min((c for c in saved if c.eval_loss is not None), key=lambda c: c.eval_loss, default=None)
    assert [c.step for c in select_prunable(saved, keep, best.step if best else None)] == pruned


D = StepDecision


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, D(False, False, False)),
        ({"default": D(False, True, False)}, D(False, True, False)),
        ({"save_due": True}, D(True, False, False)),
        ({"default": D(False, False, True)}, D(True, False, True)),  # the end of training always saves
        # SIGTERM: save; a due evaluation still starts (it is abandoned at once, keeping the RNG draw)
        ({"stop_requested": True, "default": D(False, True, False)}, D(True, True, True)),
        ({"stop_requested": True}, D(True, False, True)),
        ({"stop_requested": True, "unhealthy": True}, D(False, False, True)),
        ({"diverged": True, "default": D(True, True, True)}, D(False, False, True)),
        ({"unhealthy": True, "save_due": True}, D(False, False, False)),  # no checkpoint of a NaN step
    ],
)
def test_decide_after_step(kwargs, expected):
    args = {
        "diverged": False,
        "unhealthy": False,
        "stop_requested": False,
        "save_due": False,
        "default": D(False, False, False),
        **kwargs,
    }
    assert decide_after_step(**args) == expected


@pytest.mark.parametrize(
    ("step_s", "save_s", "grace_s", "warns"),
    [(2.0, 1.0, 25.0, False), (20.0, 4.0, 25.0, False), (20.0, 6.0, 25.0, True), (0.1, 30.0, 25.0, True)],
)
def test_grace_shortfall_warns_when_a_step_and_a_save_do_not_fit(step_s, save_s, grace_s, warns):
    message = grace_shortfall(step_s, save_s, grace_s)
    assert (message is not None) is warns
    if warns:
        assert f"checkpoints.graceSeconds={grace_s:g}s" in message
        assert "exit 75" in message
        needed = int(message.split("above ")[1].split(" ")[0])
        assert needed > step_s + save_s


def test_divergence_guard_counts_every_non_finite_step_and_the_run_of_them():
    guard = DivergenceGuard(limit=3, skip_update=False)
    seen = []
    for loss in (1.0, math.nan, math.inf, 0.5, math.nan, 0.4):
        guard.observe(torch.tensor(loss))
        guard.check_step(None, len(seen) + 1)
        seen.append((guard.consecutive, guard.total))
    assert seen == [(0, 0), (1, 1), (2, 2), (0, 2), (1, 3), (0, 3)]
    assert guard.diverged_at is None


def test_high_loss_samples_with_a_nan_loss_write_valid_json(tmp_path, tokenizer):
    dataset = [{"index": i, "input_ids": tokenizer.encode(f"sample {i}")} for i in range(3)]

    class Rows(list):  # the shape HighLossSamples reads: ds["index"] and ds[i]
        def __getitem__(self, key):
            return [r["index"] for r in self] if key == "index" else list.__getitem__(self, key)

    samples = HighLossSamples(3, tmp_path / "high_loss_samples.jsonl", Rows(dataset), tokenizer)
    samples.observe(torch.tensor([0, 1, 2]), torch.tensor([0.5, math.nan, 2.0]))
    samples.write(step=10)

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    lines = [json.loads(line, parse_constant=strict) for line in samples.path.read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == [0, 1, 2]
    assert next(line for line in lines if line["index"] == 1)["loss"] is None


@pytest.mark.parametrize(
    ("step", "last_step", "elapsed", "every_steps", "every_minutes", "due"),
    [
        (10, 0, 0, 10, None, True),
        (11, 10, 0, 10, None, False),
        (11, 10, 601, None, 10, True),
        (11, 10, 599, None, 10, False),
        (10, 10, 9999, 10, 10, False),  # just saved
        (5, 0, 0, None, None, False),
    ],
)
def test_checkpoint_due(step, last_step, elapsed, every_steps, every_minutes, due):
    assert (
        checkpoint_due(
            step=step,
            last_save_step=last_step,
            last_save_time=0.0,
            now=float(elapsed),
            every_steps=every_steps,
            every_minutes=every_minutes,
        )
        is due
    )


@pytest.mark.parametrize("lengths", [None, [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 12, 11]])
def test_sampler_order_depends_only_on_seed_and_epoch(lengths):
    sampler = EpochSeededSampler(12, seed=3, lengths=lengths, batch_size=2)
    first = list(sampler)
    torch.manual_seed(12345)  # the global RNG must not matter
    torch.rand(100)
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    assert sorted(second) == list(range(12))
    assert list(EpochSeededSampler(12, seed=3, lengths=lengths, batch_size=2)) == first


def test_per_sample_loss_matches_cross_entropy_per_row():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = -100
    labels[2, :] = -100  # no target at all: loss 0, not NaN
    got = per_sample_loss(logits, labels)
    for row in range(2):
        expected = torch.nn.functional.cross_entropy(logits[row, :-1], labels[row, 1:], ignore_index=-100)
        torch.testing.assert_close(got[row], expected)
    assert got[2] == 0


def test_a_complete_save_left_in_staging_is_recovered(tmp_path):
    save(tmp_path, 5)
    sealed = save(tmp_path / "elsewhere", 10)
    (tmp_path / checkpoints.STAGING).mkdir()
    sealed.path.rename(tmp_path / checkpoints.STAGING / "checkpoint-10")
    # As if the kill came after the manifest, before the move out of staging: nothing was lost.
    assert [c.step for c in scan(tmp_path)] == [5, 10]
    assert not (tmp_path / checkpoints.SET_ASIDE).exists()


def test_a_replaced_checkpoint_comes_back_if_its_successor_never_arrived(tmp_path):
    old = save(tmp_path, 10)
    old.path.rename(tmp_path / ".replaced-checkpoint-10-1")  # killed between the two renames
    assert [c.step for c in scan(tmp_path)] == [10]
    assert (tmp_path / "checkpoint-10" / "manifest.json").exists()


def test_an_interrupted_prune_is_finished(tmp_path):
    doomed = save(tmp_path, 1)
    doomed.path.rename(tmp_path / ".deleting-checkpoint-1")
    (tmp_path / ".deleting-checkpoint-1" / "optimizer.pt").unlink()  # half deleted
    save(tmp_path, 2)
    assert [c.step for c in scan(tmp_path)] == [2]
    assert not (tmp_path / ".deleting-checkpoint-1").exists()
    assert not (tmp_path / checkpoints.SET_ASIDE).exists()


def test_prune_keeps_the_trackers_best_even_when_a_manifest_says_lower():
    saved = [ck(1, 0.50), ck(2, 0.49), ck(3), ck(4)]  # step 2 beat step 1 by less than minDelta
    assert [c.step for c in select_prunable(saved, keep=1, best_step=1)] == [2, 3]


WATCHDOG = """
import os, signal, sys, time
from kubetune_trainer.guards import StopRequest

stop = StopRequest(grace_seconds=0.5)
stop.install()
with stop.at_safe_points():
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not stop.requested and time.monotonic() < deadline:  # the handler runs between bytecodes
        time.sleep(0.01)
    if sys.argv[1] == "saved":
        stop.save_begins()
        stop.save_ends()
    time.sleep(30)  # stuck after the save (closing the sinks, a slow filesystem): the watchdog decides
"""


@pytest.mark.parametrize(
    ("saved", "code", "says"), [("saved", 143, "after saving a checkpoint"), ("not", 75, "without")]
)
def test_the_watchdog_exit_says_whether_a_checkpoint_was_saved(tmp_path, saved, code, says):
    script = tmp_path / "watchdog.py"
    script.write_text(WATCHDOG)
    proc = subprocess.run([sys.executable, str(script), saved], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == code, proc.stderr
    assert says in proc.stderr


HOLD_LOCK = """
import sys, time
from pathlib import Path
from kubetune_trainer.checkpoints import exclusive

with exclusive(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_one_run_at_a_time_holds_a_checkpoints_dir(tmp_path):
    from kubetune_trainer.errors import PreflightError

    root = tmp_path / "ckpt"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(
                PreflightError,
                match=rf"checkpoints.dir={root} is in use by another kubetune-train run "
                rf"\(pid {holder.pid} on ",
            ),
            checkpoints.exclusive(root),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with checkpoints.exclusive(root):  # the kernel dropped the lock with the killed process
        assert not scan(root), "the lock file is no checkpoint"


def test_a_checkpoints_dir_that_cannot_be_made_is_not_locked_and_taints_no_later_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="own error") as raised, checkpoints.exclusive(tmp_path / "file" / "ckpt"):
        raise ValueError("the run's own error")
    assert raised.value.__context__ is None, "an OSError context would read as 'volume full' (is_disk_full)"


@pytest.mark.parametrize(
    ("files", "ours"),
    [
        ([], True),
        ([".kubetune-output", "notes.txt"], True),  # marked: ours, whatever else is in it
        (
            ["metrics.json", "adapter_model.safetensors", "config.yaml", "README.md"],
            True,
        ),  # an earlier version's export
        (["preflight.json"], True),  # an earlier version's failed preflight
        (["config.yaml", "README.md"], False),  # a user's experiment folder
        (["data.csv"], False),
    ],
)
def test_output_dir_claim(tmp_path, files, ours):
    out = tmp_path / "out"
    out.mkdir()
    for name in files:
        (out / name).write_text("x")
    if ours:
        checkpoints.claim_output_dir(out)
        assert (out / checkpoints.OUTPUT_MARKER).is_file()
    else:
        with pytest.raises(checkpoints.ConfigError, match="holds files kubetune did not write"):
            checkpoints.claim_output_dir(out)
        assert not (out / checkpoints.OUTPUT_MARKER).exists()
