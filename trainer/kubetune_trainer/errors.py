"""Errors the trainer raises on purpose, each mapped to the process exit code of
the operator contract (ARCHITECTURE.md, contract 3)::

    KubetuneError            exit 1   base; never raised itself
    ├── ConfigError          exit 2   invalid configuration: the Job must not retry
    │   ├── DataError        exit 2   the dataset is unreadable or malformed
    │   └── OtherRunError    exit 2   checkpoints.dir or output.dir holds another run's files
    ├── PreflightError       exit 3   a preflight check failed
    ├── DivergedError        exit 4   the loss stopped being finite
    ├── StorageFullError     exit 5   the checkpoint or output volume is full
    ├── OutOfMemoryError     exit 6   the GPU ran out of memory
    └── Interrupted          exit 143 stopped by SIGTERM (130: Ctrl-C); nothing newer to save

    Stopped (BaseException)           raised from the signal handler outside the training loop;
                                      the run turns it into Interrupted
    exit 75 (GRACE_EXPIRED_EXIT_CODE) no safe point within checkpoints.graceSeconds of SIGTERM:
                                      the watchdog ended the process without a new checkpoint

The CLI prints ``str(error)`` and exits with ``error.exit_code``; a user error never
shows a traceback. Messages say what to change, not only what went wrong. ``reason``
is the machine-readable word the operator puts in the TrainingRun's status.

Exits 5 and 6 extend the contract: retrying on a full volume, or with the same batch on
the same GPU, cannot succeed and would hold the GPU to fail again, so the Job fails at
once instead of retrying. Exit 75 (sysexits' EX_TEMPFAIL) keeps 143's promise ("stopped
after saving") true: a retry resumes from the previous checkpoint, as after any crash.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from kubetune_trainer.contract import TERMINATION_LOG_ENV

# Exit codes after a graceful stop, as a shell reports death by these signals (128 + signum).
SIGNAL_EXIT_CODES: Mapping[signal.Signals, int] = MappingProxyType({signal.SIGTERM: 143, signal.SIGINT: 130})
# The stop watchdog's exit: the grace period ran out before a safe point (no new checkpoint).
GRACE_EXPIRED_EXIT_CODE = 75
GRACE_EXPIRED_REASON = "StopTimedOut"


class KubetuneError(Exception):
    exit_code = 1
    reason = "Error"


class ConfigError(KubetuneError):
    exit_code = 2
    reason = "InvalidSpec"

    def __init__(self, message: str, *, check: str | None = None) -> None:
        super().__init__(message)
        self.check = check  # the preflight check this failure belongs to, when it is one


class DataError(ConfigError):
    def __init__(self, message: str, *, check: str = "dataset") -> None:
        super().__init__(message, check=check)


class OtherRunError(ConfigError):
    """The volume holds another run's checkpoints or adapter: in a cluster, a TrainingRun deleted and applied again
    under its name with other settings finds the old run's volume. Its own reason lets the operator say what to
    do there (the spec cannot change; the volume or the name can)."""

    reason = "VolumeHoldsOtherRun"


class PreflightError(KubetuneError):
    exit_code = 3
    reason = "PreflightFailed"


class DivergedError(KubetuneError):
    exit_code = 4
    reason = "Diverged"


class StorageFullError(KubetuneError):
    exit_code = 5
    reason = "VolumeFull"


class OutOfMemoryError(KubetuneError):
    exit_code = 6
    reason = "OutOfMemory"


class Interrupted(KubetuneError):
    exit_code = 143
    reason = "Interrupted"

    @classmethod
    def by(cls, signum: signal.Signals | None, what: str) -> Interrupted:
        """'Stopped by SIGTERM <what>', exiting as a shell reports that signal (143; 130 for Ctrl-C)."""
        error = cls(f"Stopped by {signum.name if signum else 'a signal'} {what}")
        error.exit_code = SIGNAL_EXIT_CODES.get(signum, cls.exit_code) if signum else cls.exit_code
        return error


class StopTimedOut(KubetuneError):
    """No safe point within checkpoints.graceSeconds of SIGTERM: the watchdog ends the process unsaved."""

    exit_code = GRACE_EXPIRED_EXIT_CODE
    reason = GRACE_EXPIRED_REASON


class Stopped(BaseException):
    """SIGTERM or Ctrl-C outside the training loop, raised from the signal handler.

    A BaseException so that a library's ``except Exception`` cannot swallow it on its way out.
    """

    def __init__(self, signum: signal.Signals) -> None:
        super().__init__(signum.name)
        self.signal = signum


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line of text (its type's name when it has none), cut to `limit` characters: what a
    one-paragraph message quotes of a library's error."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def report_failure(error: KubetuneError) -> int:
    """Print the error; in a pod, also leave it as the container's termination message, which Kubernetes keeps
    in the pod status (the operator shows it in the TrainingRun). Returns the exit code."""
    print(f"kubetune-train: error: {error}", file=sys.stderr, flush=True)
    leave_termination_message(error.reason, str(error))
    return error.exit_code


def leave_termination_message(reason: str, message: str) -> None:
    """In a pod, leave the error as the container's termination message, which Kubernetes keeps
    in the pod status (the operator shows it in the TrainingRun). Best effort."""
    path = os.environ.get(TERMINATION_LOG_ENV)
    if path:
        try:
            Path(path).write_text(json.dumps({"reason": reason, "message": message})[:4000])
        except OSError as exc:  # the message is on stderr too, in the pod's log
            logging.getLogger(__name__).warning("could not write the termination message to %s: %s", path, exc)


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DISK_FULL_TEXT = ("No space left", "Disk quota exceeded", "File too large", "file write failed", "StorageFull")


def is_disk_full(exc: BaseException) -> bool:
    """Writers report a full disk differently (OSError, torch's RuntimeError, safetensors' own error)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(seen) for text in _DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def disk_full_message(exc: BaseException) -> str | None:
    """A user-facing message if exc means a full disk, else None."""
    if not is_disk_full(exc):
        return None
    where = next(
        (str(e.filename) for e in exception_chain(exc) if isinstance(e, OSError) and getattr(e, "filename", None)), None
    )
    place = f" writing {where}" if where else ""
    return (
        f"a volume is full{place} ({first_line(exc, 160)}). Free space on it or enlarge it "
        "(the datasets cache lives under HF_HOME or HF_DATASETS_CACHE), then run again."
    )


def exception_chain(exc: BaseException) -> list[BaseException]:
    """The exception, then what caused it or was being handled, down to the innermost."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain
