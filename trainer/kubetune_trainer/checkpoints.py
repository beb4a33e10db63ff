"""Atomic, verified checkpoints.

A checkpoint directory holds what transformers' Trainer saves (adapter, optimizer,
scheduler, RNG states, trainer_state.json), kubetune's own state, and `manifest.json`:
every file's size and sha256, the step, epoch, eval loss and the run's fingerprint.

The write is atomic: Trainer writes into ``<dir>/.staging/checkpoint-N``; `commit`
fsyncs every file, writes the manifest last, renames the directory to
``<dir>/checkpoint-N`` and fsyncs the parent. A process killed at any point leaves
either the previous set of checkpoints or the new one, never a half-written one that
looks complete. `scan` trusts a checkpoint only if its manifest verifies, and moves
anything else to ``<dir>/set-aside/`` with a note saying why: nothing is deleted
silently. `prune` removes old complete checkpoints beyond the newest N and the best.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "kubetune_state.json"
STAGING = ".staging"
SET_ASIDE = "set-aside"
PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")

# Test hook: the path of a marker file; commit touches it and pauses before the manifest,
# so a test can SIGKILL the process in the middle of a save.
PAUSE_HOOK_ENV = "KUBETUNE_FAULT_PAUSE_IN_SAVE"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    epoch: float
    eval_loss: float | None
    fingerprint: str

    @property
    def name(self) -> str:
        return self.path.name


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def commit(
    staging: Path,
    root: Path,
    *,
    step: int,
    epoch: float,
    eval_loss: float | None,
    fingerprint: str,
    state: dict[str, Any],
) -> Checkpoint:
    """Seal a staged checkpoint: kubetune state, fsync, manifest last, rename into place."""
    (staging / STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    entries = {}
    for file in _files(staging):
        fsync_path(file)
        entries[file.relative_to(staging).as_posix()] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
    for directory in sorted({f.parent for f in _files(staging)}, key=lambda p: len(p.parts), reverse=True):
        fsync_path(directory)

    marker = os.environ.get(PAUSE_HOOK_ENV)
    if marker:
        Path(marker).write_text(str(step))
        time.sleep(120)

    manifest = {
        "format": 1,
        "step": step,
        "epoch": epoch,
        "eval_loss": eval_loss,
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": entries,
    }
    tmp = staging / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, staging / MANIFEST)
    fsync_path(staging)

    final = root / checkpoint_name(step)
    if final.exists():
        # The same step saved again (a resumed run repeating a save): keep the old one until
        # the new one is in place, so a crash between the two renames still leaves one.
        old = root / f".replaced-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()  # .staging, if nothing else is being staged
    fsync_path(root)
    return Checkpoint(final, step, epoch, eval_loss, fingerprint)


def lacks_space(directory: Path, size: int) -> bool:
    """Whether `size` bytes can no longer be written in directory (full volume, quota, file size limit).

    Writers report a short write in their own words (torch's zip writer says "unexpected
    pos"), so after a failed save the volume itself is asked.
    """
    probe = directory / f".space-probe-{os.getpid()}"
    block = b"\0" * (1 << 20)
    try:
        with probe.open("wb") as fh:
            for start in range(0, size, len(block)):
                fh.write(block[: min(len(block), size - start)])
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    finally:
        probe.unlink(missing_ok=True)
    return False


def set_aside_bytes(root: Path) -> int:
    aside = root / SET_ASIDE
    return size_bytes(aside) if aside.is_dir() else 0


def size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def verify(path: Path) -> tuple[Checkpoint | None, str]:
    """(checkpoint, "") when the manifest lists exactly the files present, with their sizes
    and hashes; (None, reason) otherwise."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return None, "no manifest.json: the save did not finish"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files: dict[str, dict[str, Any]] = manifest["files"]
        step = int(manifest["step"])
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"manifest.json is unreadable ({exc})"
    present = {p.relative_to(path).as_posix() for p in _files(path)}
    if missing := sorted(set(files) - present):
        return None, f"missing file(s): {', '.join(missing)}"
    if extra := sorted(present - set(files)):
        return None, f"file(s) not in the manifest: {', '.join(extra)}"
    for rel, entry in files.items():
        file = path / rel
        if file.stat().st_size != entry.get("size"):
            return None, f"{rel} is {file.stat().st_size} bytes, the manifest says {entry.get('size')}"
        if sha256_file(file) != entry.get("sha256"):
            return None, f"{rel} does not match its sha256 in the manifest"
    eval_loss = manifest.get("eval_loss")
    return Checkpoint(
        path, step, float(manifest.get("epoch", 0.0)), eval_loss, str(manifest.get("fingerprint", ""))
    ), ""


def set_aside(root: Path, path: Path, reason: str) -> Path:
    """Move a checkpoint that must not be used to <root>/set-aside/, with a note why."""
    target_dir = root / SET_ASIDE
    target_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = target_dir / f"{path.name.lstrip('.')}-{stamp}-{os.getpid()}"
    os.replace(path, target)
    if target.is_dir():
        (target / "SET_ASIDE_REASON.txt").write_text(reason + "\n", encoding="utf-8")
    log.warning("Set aside %s -> %s: %s", path, target, reason)
    return target


def _recover(root: Path, leftover: Path, why: str) -> None:
    """A checkpoint outside its place after a kill: put it in place if it verifies and its place
    is free (the kill came after the manifest), else set it aside."""
    checkpoint, reason = verify(leftover)
    if checkpoint is not None and not (root / checkpoint_name(checkpoint.step)).exists():
        os.replace(leftover, root / checkpoint_name(checkpoint.step))
        log.warning("Recovered %s, complete but %s", checkpoint_name(checkpoint.step), why)
    else:
        set_aside(root, leftover, f"{why}; {reason or 'a verified copy of the same step is in place'}")


def scan(root: Path) -> list[Checkpoint]:
    """Complete checkpoints in root, oldest first. Anything unverifiable is set aside."""
    if not root.is_dir():
        return []
    good: list[Checkpoint] = []
    for doomed in root.glob(".deleting-*"):  # a prune interrupted by a kill: finish it
        shutil.rmtree(doomed)
    staging = root / STAGING
    if staging.is_dir():
        for leftover in sorted(staging.iterdir()):
            _recover(root, leftover, "an interrupted save left it in .staging")
        staging.rmdir()
    for path in sorted(root.glob(".replaced-*")):
        _recover(root, path, "left over from replacing a checkpoint of the same step")
    for path in sorted(root.iterdir()):
        if not _NAME.match(path.name) or not path.is_dir():
            continue
        checkpoint, reason = verify(path)
        if checkpoint is None:
            set_aside(root, path, reason)
        else:
            good.append(checkpoint)
    return sorted(good, key=lambda c: c.step)


def select_prunable(checkpoints: list[Checkpoint], keep: int, best_step: int | None) -> list[Checkpoint]:
    """Pure: which complete checkpoints to delete so that the newest `keep` and the best remain.

    "Best" is the run's own verdict (the validation tracker's best step, which honours
    earlyStoppingMinDelta), not a second opinion from the manifests.
    """
    ordered = sorted(checkpoints, key=lambda c: c.step)
    protected = {c.path for c in ordered[-keep:]} | {c.path for c in ordered if c.step == best_step}
    return [c for c in ordered if c.path not in protected]


def prune(checkpoints: list[Checkpoint], keep: int, best_step: int | None) -> list[Checkpoint]:
    """Delete old complete checkpoints; return those that remain."""
    doomed = select_prunable(checkpoints, keep, best_step)
    for c in doomed:
        # Renamed first, so a kill mid-delete leaves a name scan() knows to finish deleting.
        trash = c.path.parent / f".deleting-{c.name}"
        os.replace(c.path, trash)
        shutil.rmtree(trash)
        log.info("Removed old checkpoint %s (keeping the newest %d and the best)", c.name, keep)
    gone = {c.path for c in doomed}
    return [c for c in checkpoints if c.path not in gone]


def read_state(checkpoint: Checkpoint) -> dict[str, Any]:
    path = checkpoint.path / STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def describe(c: Checkpoint) -> str:
    loss = f", eval loss {c.eval_loss:.4f}" if c.eval_loss is not None else ""
    return f"{c.name} (step {c.step}, epoch {c.epoch:.2f}{loss})"


def to_status(c: Checkpoint) -> dict[str, Any]:
    """The checkpoint as the TrainingRun's status.checkpoint shows it."""
    return {"name": c.name, "step": c.step, "epoch": c.epoch, "evalLoss": c.eval_loss, "path": str(c.path)}
