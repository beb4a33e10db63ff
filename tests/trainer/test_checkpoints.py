"""The checkpoint store and the decisions around it, without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetune_trainer import checkpoints
from kubetune_trainer.checkpoints import Checkpoint, commit, scan, select_prunable, verify
from kubetune_trainer.data import EpochSeededSampler
from kubetune_trainer.guards import StepDecision, checkpoint_due, decide_after_step
from kubetune_trainer.report import per_sample_loss


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


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json is unreadable"),
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


def test_an_interrupted_save_in_staging_is_set_aside(tmp_path):
    good = save(tmp_path, 5)
    stage(tmp_path, 10)  # Trainer wrote it, commit never ran
    assert scan(tmp_path) == [good]
    assert not (tmp_path / checkpoints.STAGING).exists()
    (aside,) = (tmp_path / checkpoints.SET_ASIDE).iterdir()
    assert "interrupted save" in (aside / "SET_ASIDE_REASON.txt").read_text()


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
