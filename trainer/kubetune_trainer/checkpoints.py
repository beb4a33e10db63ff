"""Atomic, verified checkpoints.

A checkpoint directory holds what transformers' Trainer saves (adapter, optimizer,
scheduler, RNG states, trainer_state.json), kubetune's own state, and `manifest.json`:
every file's size and sha256, the step, epoch, eval loss and the run's fingerprint.

The write is atomic: Trainer writes into ``<dir>/.staging/checkpoint-N``; `commit`
fsyncs and hashes every file (one read each), writes the manifest last, renames the
directory to ``<dir>/checkpoint-N`` and fsyncs the parent. A process killed at any point
leaves either the previous set of checkpoints or the new one, never a half-written one
that looks complete. `scan` trusts a checkpoint only if its manifest verifies (every field
of the right type, the step matching the folder's name, the files' sizes and hashes), and
moves anything else to ``<dir>/set-aside/`` with a note saying why: nothing is deleted
silently. `prune` removes old complete checkpoints beyond the newest N and the best.

Every directory that is deleted is first renamed to ``.deleting-*``, so a kill in the middle
of a delete leaves a name `scan` knows to finish deleting, not a damaged checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import resource
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubetune_trainer import contract
from kubetune_trainer.errors import ConfigError, PreflightError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "kubetune_state.json"
STAGING = ".staging"
LOCK = ".lock"
SET_ASIDE = "set-aside"
REASON = "SET_ASIDE_REASON.txt"
PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
# checkpoint-N, and .replaced-checkpoint-N-PID (the old copy while a step is saved again)
_STEP_IN_NAME = re.compile(rf"^(?:\.replaced-)?{PREFIX}(\d+)(?:-\d+)?$")
_PROBE_BYTES = 1 << 20


class _FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """manifest.json, validated whole: a manifest with a field of the wrong type sets its
    checkpoint aside like any other damage, instead of failing later on use."""

    model_config = ConfigDict(extra="ignore", strict=True)  # a newer writer may add fields
    format: Literal[1]
    step: int = Field(ge=0)
    epoch: float = Field(ge=0, allow_inf_nan=False)
    eval_loss: float | None = None
    fingerprint: str
    created: str = ""
    files: dict[str, _FileEntry]


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


def _seal(file: Path, chunk: int = 1 << 20) -> _FileEntry:
    """fsync a file and hash it in the same pass: one open, one read."""
    digest = hashlib.sha256()
    size = 0
    with file.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            size += len(block)
        os.fsync(fh.fileno())
    return _FileEntry(size=size, sha256=digest.hexdigest())


def write_atomic(path: Path, text: str, *, durable: bool = False) -> None:
    """Replace `path` with `text` in one rename: a reader, or a kill, sees the old file or the new one, whole.
    durable: fsync the file and its directory too (the rename survives a power loss)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    if durable:
        fsync_path(tmp)
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)


def write_manifest(staging: Path, manifest: dict[str, Any]) -> None:
    """The last write of a save: until it is in place the checkpoint does not count.
    (Tests that kill a process in the middle of a save pause here.)"""
    write_atomic(staging / MANIFEST, json.dumps(manifest, indent=2, allow_nan=False) + "\n", durable=True)


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
    files = _files(staging)
    entries = {file.relative_to(staging).as_posix(): _seal(file) for file in files}  # fsynced as they are hashed
    _fsync_deepest_first({f.parent for f in files})
    if eval_loss is not None and not math.isfinite(eval_loss):
        eval_loss = None  # manifest.json stays strict JSON; a NaN evaluation is no one's best
    manifest = Manifest(
        format=1,
        step=step,
        epoch=float(epoch),
        eval_loss=eval_loss,
        fingerprint=fingerprint,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        files=entries,
    )
    write_manifest(staging, manifest.model_dump(mode="json"))

    final = root / checkpoint_name(step)
    if final.exists():
        # The same step saved again (a resumed run repeating a save): keep the old one until
        # the new one is in place, so a crash between the two renames still leaves one.
        old = root / f".replaced-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(staging, final)
        doomed = root / f".deleting-{old.name.lstrip('.')}"
        os.replace(old, doomed)
        fsync_path(root)
        shutil.rmtree(doomed)
    else:
        os.replace(staging, final)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()  # .staging, if nothing else is being staged
    fsync_path(root)
    return Checkpoint(final, step, epoch, eval_loss, fingerprint)


def _fsync_deepest_first(directories: set[Path]) -> None:
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        fsync_path(directory)


def fsync_tree(root: Path) -> None:
    """Make a freshly written tree durable before it is renamed into place: every file, then every directory
    from the deepest up (a directory's fsync makes the names in it durable)."""
    files = _files(root)
    for file in files:
        fsync_path(file)
    _fsync_deepest_first({f.parent for f in files} | {root})


def make_dirs(path: Path) -> None:
    """mkdir -p that also makes the new directories durable: each new level's parent is fsynced,
    so a power loss cannot forget checkpoints.dir along with the checkpoints in it."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        fsync_path(directory.parent)


@contextlib.contextmanager
def exclusive(root: Path) -> Iterator[None]:
    """Hold checkpoints.dir for this process while it runs: a second run on the same directory would set
    aside this one's save in progress and prune the checkpoint it is about to resume from.

    An flock on root/.lock, which the kernel drops when the process ends, SIGKILL included, so a crash
    never leaves the directory locked. When root cannot be created the lock is skipped: preflight's
    disk.checkpoints check reports that directory."""
    try:
        make_dirs(root)
        handle = (root / LOCK).open("a+", encoding="utf-8")
    except OSError:
        handle = None
    if handle is None:  # yielded outside the except: the run's own errors must not carry this OSError
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise PreflightError(
                f"checkpoints.dir={root} is in use by another kubetune-train run ({holder}): two runs on one "
                "directory would prune and set aside each other's checkpoints. Wait for that run to end, or set "
                "another checkpoints.dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield  # the lock goes with the file's close


def unmarked_files(directory: Path, marker: str) -> set[str]:
    """Names in `directory` when this tool has not marked it as its own; empty when marked, empty or absent."""
    if not directory.is_dir() or (directory / marker).exists():
        return set()
    return {p.name for p in directory.iterdir()}


def mark_dir(directory: Path, marker: str, note: str) -> None:
    """Make `directory` (durably) and mark it as this tool's, so a later run may replace what it wrote there."""
    make_dirs(directory)
    (directory / marker).write_text(note + "\n", encoding="utf-8")


OUTPUT_MARKER = ".kubetune-output"
# What kubetune writes to output.dir (and the tokenizer's files): a directory holding only these, and no
# marker, is an earlier version's output, not a user's folder.
_OUTPUT_NAMES = frozenset(
    {
        *contract.ADAPTER_FILES,
        contract.CONFIG_FILE,
        contract.METRICS_FILE,
        contract.LOG_HISTORY_FILE,
        contract.LOSS_CURVES_FILE,
        contract.PREFLIGHT_FILE,
        contract.PROGRESS_FILE,
        contract.HIGH_LOSS_FILE,
        contract.EVAL_FILE,
        contract.PREDICTIONS_FILE,
        "README.md",  # peft's model card
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
    }
)


def claim_output_dir(out: Path) -> None:
    """Make output.dir this tool's before the first write into it: new or empty, it is marked as ours; marked,
    it is ours; anything else is a user's folder, whose files (a config.yaml, a README.md) an export would
    replace, and is refused. A file or an unwritable path is left to preflight's disk.output check."""
    names = {n for n in unmarked_files(out, OUTPUT_MARKER) if not n.startswith(".export-")}
    earlier_output = names <= _OUTPUT_NAMES and bool(names & {contract.METRICS_FILE, contract.PREFLIGHT_FILE})
    if names and not earlier_output:
        shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise ConfigError(
            f"output.dir={out} holds files kubetune did not write ({shown}); an export would replace some of "
            "them. Point output.dir at a new or empty directory (--set output.dir=...)."
        )
    if out.exists() and not out.is_dir():
        return
    with contextlib.suppress(OSError):
        mark_dir(out, OUTPUT_MARKER, "written by kubetune-train: its adapter, reports and logs")


def lacks_space(directory: Path, need: int, largest_file: int = 0) -> bool:
    """Whether the volume of `directory` has no room for `need` bytes, or a file of `largest_file`
    bytes cannot be written (full volume, file size limit, quota).

    Writers report a short write in their own words (torch's zip writer says "unexpected pos"),
    so after a failed save the volume itself is asked: its free space, the process's file size
    limit, and a small probe write for what neither shows (a quota already used up).
    """
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    if st.f_bavail * st.f_frsize < need:
        return True
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY and limit < largest_file:
        return True
    probe = directory / f".space-probe-{os.getpid()}"
    try:
        with probe.open("wb") as fh:
            fh.write(b"\0" * min(_PROBE_BYTES, max(need, 1)))
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


def step_in_name(name: str) -> int | None:
    """The step a checkpoint's folder name says (checkpoint-N, .replaced-checkpoint-N-PID)."""
    m = _STEP_IN_NAME.match(name)
    return int(m.group(1)) if m else None


def _manifest_problem(error: ValidationError) -> str:
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return f"manifest.json is not valid JSON ({first['msg'].removeprefix('Invalid JSON: ')})"
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    more = f" and {error.error_count() - 1} more" if error.error_count() > 1 else ""
    return f"manifest.json is invalid: {where}: {first['msg']}{more}"


def verify(path: Path) -> tuple[Checkpoint | None, str]:
    """(checkpoint, "") when the manifest is valid, its step is the folder's, and it lists exactly
    the files present, with their sizes and hashes; (None, reason) otherwise."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return None, "no manifest.json: the save did not finish"
    try:
        manifest = Manifest.model_validate_json(manifest_path.read_bytes())
    except ValidationError as exc:
        return None, _manifest_problem(exc)
    except OSError as exc:
        return None, f"manifest.json is unreadable ({exc.strerror})"
    named = step_in_name(path.name)
    if named is not None and manifest.step != named:
        return None, f"manifest.json says step {manifest.step}, the folder's name says {named}"
    files = manifest.files
    present = {p.relative_to(path).as_posix() for p in _files(path)}
    if missing := sorted(set(files) - present):
        return None, f"missing file(s): {', '.join(missing)}"
    if extra := sorted(present - set(files)):
        return None, f"file(s) not in the manifest: {', '.join(extra)}"
    for rel, entry in files.items():
        file = path / rel
        if file.stat().st_size != entry.size:
            return None, f"{rel} is {file.stat().st_size} bytes, the manifest says {entry.size}"
        if sha256_file(file) != entry.sha256:
            return None, f"{rel} does not match its sha256 in the manifest"
    return Checkpoint(path, manifest.step, manifest.epoch, manifest.eval_loss, manifest.fingerprint), ""


def _free_name(directory: Path, base: str) -> Path:
    """base, or base-2, base-3, ...: the first name not taken in directory."""
    target, n = directory / base, 1
    while target.exists() or (directory / f"{target.name}.{REASON}").exists():
        n += 1
        target = directory / f"{base}-{n}"
    return target


def set_aside(root: Path, path: Path, reason: str) -> Path:
    """Move a checkpoint that must not be used to <root>/set-aside/, with a note why.

    The note is written before the move, so a kill between the two never leaves a set-aside
    checkpoint without its reason (a kill before the move leaves it where it was, to be set
    aside again by the next scan)."""
    target_dir = root / SET_ASIDE
    make_dirs(target_dir)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = _free_name(target_dir, f"{path.name.lstrip('.')}-{stamp}-{os.getpid()}")
    note = path / REASON if path.is_dir() else target_dir / f"{target.name}.{REASON}"
    try:
        earlier = note.read_text(encoding="utf-8") if note.is_file() else ""
        note.write_text(earlier + reason + "\n", encoding="utf-8")  # an interrupted set-aside's note stays first
    except OSError as exc:  # a full volume, say: the move matters more, and the log has the reason
        log.warning("Could not write %s: %s", note, exc.strerror)
    os.replace(path, target)
    fsync_path(target_dir)
    fsync_path(path.parent)
    log.warning("Set aside %s -> %s: %s", path, target, reason)
    return target


def _recover(root: Path, leftover: Path, why: str) -> None:
    """A checkpoint outside its place after a kill: put it in place if it verifies and its place
    is free (the kill came after the manifest), else set it aside."""
    checkpoint, reason = verify(leftover)
    if checkpoint is not None and not (root / checkpoint_name(checkpoint.step)).exists():
        os.replace(leftover, root / checkpoint_name(checkpoint.step))
        fsync_path(root)
        log.warning("Recovered %s, complete but %s", checkpoint_name(checkpoint.step), why)
    else:
        set_aside(root, leftover, f"{why}; {reason or 'a verified copy of the same step is in place'}")


def scan(root: Path) -> list[Checkpoint]:
    """Complete checkpoints in root, oldest first. Anything unverifiable is set aside."""
    if not root.is_dir():
        return []
    good: list[Checkpoint] = []
    for doomed in root.glob(".deleting-*"):  # a delete interrupted by a kill: finish it
        shutil.rmtree(doomed)
    staging = root / STAGING
    if staging.is_dir():
        for leftover in sorted(staging.iterdir()):
            _recover(root, leftover, "an interrupted save left it in .staging")
        staging.rmdir()
        fsync_path(root)
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
    # Renamed first, so a kill mid-delete leaves a name scan() knows to finish deleting.
    trash = [c.path.parent / f".deleting-{c.name}-{os.getpid()}" for c in doomed]
    for c, path in zip(doomed, trash, strict=True):
        os.replace(c.path, path)
    if doomed:
        fsync_path(doomed[0].path.parent)
    for c, path in zip(doomed, trash, strict=True):
        shutil.rmtree(path)
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
