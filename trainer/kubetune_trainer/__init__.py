"""kubetune's trainer: LoRA fine-tuning from one config file.

The public names below import nothing heavier than pydantic, so the operator can use
the config models; `run` pulls in torch and transformers when it is first touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kubetune_trainer.config import TrainConfig, load_config
from kubetune_trainer.errors import (
    ConfigError,
    DataError,
    DivergedError,
    Interrupted,
    KubetuneError,
    PreflightError,
)

if TYPE_CHECKING:
    from kubetune_trainer.train import RunResult, run

__all__ = [
    "ConfigError",
    "DataError",
    "DivergedError",
    "Interrupted",
    "KubetuneError",
    "PreflightError",
    "RunResult",
    "TrainConfig",
    "load_config",
    "run",
]


def __getattr__(name: str) -> Any:
    if name in ("run", "RunResult"):
        from kubetune_trainer import train

        return getattr(train, name)
    raise AttributeError(f"module 'kubetune_trainer' has no attribute {name!r}")
