"""Every example works as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kubetune_trainer.config import load_config
from kubetune_trainer.data import prepare

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CONFIGS = sorted((ROOT / "examples").glob("local-*.yaml"))


@pytest.mark.parametrize("path", LOCAL_CONFIGS, ids=lambda p: p.name)
def test_local_configs_validate(path):
    load_config(path)


def test_chat_example_data_is_valid_and_masks_assistant_turns(monkeypatch, tokenizer):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "examples" / "local-qwen2.5-chat.yaml")
    data = prepare(cfg.dataset, tokenizer)  # the tiny tokenizer has a ChatML template like Qwen's
    assert data.format == "chat"
    for i in (0, 1, 2):
        row, raw = data.train[i], data.raw["train"][i]
        learned = tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100])
        assistant = [m["content"] for m in raw["messages"] if m["role"] == "assistant"]
        assert learned == "".join(f"{a}<|im_end|>\n" for a in assistant) + tokenizer.eos_token


def test_local_tiny_example_runs_after_the_quickstart_setup(monkeypatch, tmp_path):
    from kubetune_trainer.quickstart import prepare_workdir
    from kubetune_trainer.train import run

    monkeypatch.chdir(tmp_path)
    prepare_workdir(Path("kubetune-quickstart"), branches=12, max_steps=4)
    cfg = load_config(ROOT / "examples" / "local-tiny.yaml", ["training.maxSteps=3", "evaluation.evalSteps=3"])
    result = run(cfg, sinks=[])
    assert result.metrics["global_step"] == 3
    assert (tmp_path / "runs" / "local-tiny" / "output" / "adapter_model.safetensors").is_file()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    test_command = next(c.strip() for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("trainingrun-*.yaml")), ids=lambda p: p.name)
def test_trainingrun_examples_are_valid_runs(path):
    import yaml

    from kubetune_operator import api

    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == api.API_VERSION
    assert manifest["kind"] == api.KIND
    api.TrainingRunSpec.model_validate(manifest["spec"])
