"""Errors the trainer raises on purpose, each mapped to the process exit code of
the operator contract (ARCHITECTURE.md, contract 3)::

    KubetuneError            exit 1   base; never raised itself
    ├── ConfigError          exit 2   invalid configuration: the Job must not retry
    │   └── DataError        exit 2   the dataset is unreadable or malformed
    ├── PreflightError       exit 3   a preflight check failed
    ├── DivergedError        exit 4   the loss stopped being finite
    └── Interrupted          exit 143 stopped by SIGTERM after saving a checkpoint

The CLI prints ``str(error)`` and exits with ``error.exit_code``; a user error never
shows a traceback. Messages say what to change, not only what went wrong.
"""

from __future__ import annotations


class KubetuneError(Exception):
    exit_code = 1


class ConfigError(KubetuneError):
    exit_code = 2


class DataError(ConfigError):
    pass


class PreflightError(KubetuneError):
    exit_code = 3


class DivergedError(KubetuneError):
    exit_code = 4


class Interrupted(KubetuneError):
    exit_code = 143
