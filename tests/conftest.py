"""Shared fixtures: a tiny model built locally (no model hub here) and data to train it on; `kubetune-train`
as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def qa_rows() -> list[dict[str, str]]:
    from kubetune_trainer.qa import render_pairs
    from kubetune_trainer.quickstart import BRANCH_TEMPLATES, branch_records

    return render_pairs(branch_records(24), BRANCH_TEMPLATES)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, qa_rows: list[dict[str, str]]) -> Path:
    """A random-initialised 2-layer Qwen2 and its BPE tokenizer, saved with save_pretrained."""
    from kubetune_trainer.quickstart import build_tiny_model

    texts = [r["prompt"] + r["completion"] for r in qa_rows]
    return build_tiny_model(
        texts, tmp_path_factory.mktemp("tiny-model"), hidden_size=64, layers=2, heads=2, vocab_size=320
    )


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def qa_file(tmp_path: Path, qa_rows: list[dict[str, str]]) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", qa_rows)


@pytest.fixture
def make_config(tmp_path: Path, tiny_model: Path, qa_file: Path) -> Callable[..., Any]:
    """make_config(**{"training.maxSteps": 4}) -> TrainConfig for the tiny model, outputs under tmp_path."""
    from kubetune_trainer.config import TrainConfig, apply_overrides

    def make(**overrides: Any) -> TrainConfig:
        raw = {
            "model": {"nameOrPath": str(tiny_model)},
            "dataset": {"path": str(qa_file), "maxSeqLength": 64, "preparedDir": str(tmp_path / "prepared")},
            "training": {"maxSteps": 8, "batchSize": 8, "learningRate": 3e-3, "loggingSteps": 1},
            "checkpoints": {"dir": str(tmp_path / "checkpoints")},
            "output": {"dir": str(tmp_path / "output")},
        }
        raw = apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
        return TrainConfig.model_validate(raw)

    return make


def kubetune_train(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`kubetune-train ARGS` as a user runs it (the console script, or `python -m` where none is installed):
    its exit code, stdout and stderr. `env` adds to this process's environment."""
    script = Path(sys.executable).with_name("kubetune-train")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kubetune_trainer.cli"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
