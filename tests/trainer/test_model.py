"""Model: precision and attention per hardware, the LoRA config, LoRA names that match nothing, broken weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import peft
import pytest
import torch
import yaml

from kubetune_trainer.config import LoraConfig, ModelConfig
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.model import (
    Hardware,
    add_lora,
    apply_lora,
    build_lora_config,
    load_model,
    resolve_attention,
    resolve_precision,
    unmatched_lora_modules,
    weight_file_problem,
)
from tests.conftest import kubetune_train

CPU = Hardware(cuda=False)
H100 = Hardware(cuda=True, device_count=8, bf16=True, flash_attn=True, device_name="NVIDIA H100")
A100_NO_FLASH = Hardware(cuda=True, device_count=1, bf16=True, flash_attn=False, device_name="NVIDIA A100")
V100 = Hardware(cuda=True, device_count=1, bf16=False, flash_attn=False, device_name="Tesla V100")


@pytest.mark.parametrize(
    ("requested", "hw", "expected"),
    [
        ("auto", CPU, "fp32"),
        ("auto", H100, "bf16"),
        ("auto", V100, "fp16"),
        ("bf16", H100, "bf16"),
        ("fp16", H100, "fp16"),
        ("fp16", V100, "fp16"),
        ("fp32", H100, "fp32"),
        ("fp32", CPU, "fp32"),
    ],
)
def test_precision_follows_the_hardware(requested, hw, expected):
    assert resolve_precision(requested, hw) == expected


@pytest.mark.parametrize(
    ("requested", "hw", "message"),
    [
        ("bf16", CPU, "training.precision=bf16 needs a GPU"),
        ("fp16", CPU, "training.precision=fp16 needs a GPU"),
        ("bf16", V100, "training.precision=bf16 is not supported by Tesla V100. Use precision auto"),
    ],
)
def test_precision_the_hardware_cannot_do_is_refused(requested, hw, message):
    with pytest.raises(ConfigError, match=message):
        resolve_precision(requested, hw)


@pytest.mark.parametrize(
    ("requested", "hw", "expected"),
    [
        ("auto", H100, "flash_attention_2"),
        ("auto", A100_NO_FLASH, "sdpa"),  # flash-attn not installed
        ("auto", V100, "sdpa"),
        ("auto", CPU, "sdpa"),
        ("sdpa", H100, "sdpa"),
        ("eager", CPU, "eager"),
        ("flash_attention_2", H100, "flash_attention_2"),
    ],
)
def test_attention_follows_the_hardware(requested, hw, expected):
    assert resolve_attention(requested, hw) == expected


@pytest.mark.parametrize("hw", [A100_NO_FLASH, CPU])
def test_flash_attention_without_flash_attn_is_refused(hw):
    with pytest.raises(ConfigError, match=r"model\.attnImplementation=flash_attention_2 needs"):
        resolve_attention("flash_attention_2", hw)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {},
            {
                "r": 16,
                "lora_alpha": 32,
                "lora_dropout": 0.05,
                "target_modules": "all-linear",
                "modules_to_save": None,
                "bias": "none",
                "use_rslora": False,
            },
        ),
        (
            {
                "r": 4,
                "alpha": 8,
                "dropout": 0.0,
                "targetModules": ["q_proj", "v_proj"],
                "modulesToSave": ["embed_tokens", "lm_head"],
                "bias": "lora_only",
                "useRslora": True,
            },
            {
                "r": 4,
                "lora_alpha": 8,
                "lora_dropout": 0.0,
                "target_modules": {"q_proj", "v_proj"},
                "modules_to_save": ["embed_tokens", "lm_head"],
                "bias": "lora_only",
                "use_rslora": True,
            },
        ),
        ({"targetModules": "q_proj"}, {"target_modules": {"q_proj"}}),
    ],
    ids=["defaults", "every-setting", "one-name"],
)
def test_lora_settings_map_onto_peft(settings, expected):
    config = build_lora_config(LoraConfig.model_validate(settings))
    assert config.task_type == peft.TaskType.CAUSAL_LM
    assert {name: getattr(config, name) for name in expected} == expected


LINEAR = ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]
MODULES = sorted([*LINEAR, "embed_tokens", "mlp", "model", "norm", "self_attn"])
ADAPTED = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


@pytest.mark.parametrize(
    ("settings", "saved", "expected"),
    [
        ({"targetModules": ["q_proj", "v_proj"]}, [], []),
        ({"targetModules": ["self_attn.q_proj", "model.layers.0.self_attn.v_proj"]}, [], []),
        ({"targetModules": ["q_proj", "v_projj"]}, [], ["lora.targetModules[1]='v_projj' matches no layer"]),
        ({"targetModules": ["attn.q_proj"]}, [], ["lora.targetModules[0]='attn.q_proj' matches no layer"]),
        ({}, [], []),  # all-linear: peft itself refuses a model without linear layers
        ({"modulesToSave": ["embed_tokens"]}, ["base_model.model.model.embed_tokens"], []),
        (
            {"modulesToSave": ["lm_head", "embed_tokenz"]},
            ["base_model.model.lm_head"],
            ["lora.modulesToSave[1]='embed_tokenz' matches no module of this model; did you mean 'embed_tokens'?"],
        ),
        (
            {"targetModules": ["qproj"], "modulesToSave": ["head"]},
            [],
            [
                "lora.targetModules[0]='qproj' matches no layer of this model; did you mean 'q_proj'?",
                "modulesToSave[0]",
            ],
        ),
    ],
)
def test_unmatched_lora_modules(settings, saved, expected):
    problems = unmatched_lora_modules(
        LoraConfig.model_validate(settings), adapted=ADAPTED, saved=saved, linear=LINEAR, modules=MODULES
    )
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected, strict=True):
        assert start in problem
        assert ("Linear layers in this model: down_proj" if "targetModules" in start else "Modules in this") in problem


@pytest.fixture
def base(tiny_model):
    return load_model(ModelConfig(name_or_path=str(tiny_model)), "fp32", "sdpa")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"modulesToSave": ["embed_tokenz"]}, r"lora.modulesToSave\[0\]='embed_tokenz' .*did you mean 'embed_tokens'"),
        ({"targetModules": ["q_proj", "v_projj"]}, r"lora.targetModules\[1\]='v_projj' .*did you mean 'v_proj'"),
        ({"targetModules": ["attn_qkv"]}, r"lora.targetModules: .*attn_qkv.* Linear layers in this model: .*q_proj"),
    ],
)
def test_lora_names_that_match_nothing_are_refused(base, settings, message):
    """peft silently ignores the first two (the run trained without the weights asked for)."""
    with pytest.raises(ConfigError, match=message) as error:
        add_lora(base, LoraConfig.model_validate(settings))
    assert error.value.check == "model.target_modules"


def test_lora_names_that_match_train_what_they_name(base):
    model = apply_lora(base, LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"]), False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if "lora_A" in n} == {"q_proj"}


@pytest.mark.parametrize("enabled", [True, False])
def test_gradient_checkpointing_is_set_on_the_model(base, enabled):
    model = apply_lora(base, LoraConfig(), gradient_checkpointing=enabled)
    assert model.get_base_model().is_gradient_checkpointing is enabled
    assert model.get_base_model().config.use_cache is False


@pytest.fixture
def truncated_model(tiny_model, tmp_path) -> Path:
    copy = shutil.copytree(tiny_model, tmp_path / "model")
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    return copy


def test_weight_file_problem(tiny_model, truncated_model, tmp_path):
    assert weight_file_problem(tiny_model / "model.safetensors") is None
    assert "incomplete metadata" in weight_file_problem(truncated_model / "model.safetensors")
    torch.save({"w": torch.zeros(64)}, tmp_path / "pytorch_model.bin")
    assert weight_file_problem(tmp_path / "pytorch_model.bin") is None
    (tmp_path / "cut.bin").write_bytes((tmp_path / "pytorch_model.bin").read_bytes()[:100])
    assert weight_file_problem(tmp_path / "cut.bin")


def test_truncated_weights_are_a_config_error_naming_the_file(truncated_model):
    with pytest.raises(ConfigError, match="cannot load the model weights") as error:
        load_model(ModelConfig(name_or_path=str(truncated_model)), "fp32", "sdpa")
    assert f"{truncated_model / 'model.safetensors'} is unreadable" in str(error.value)
    assert "Copy or save the model there again" in str(error.value)


def test_a_runtime_error_with_intact_weights_stays_a_crash(tiny_model, monkeypatch):
    """A GPU that fails while loading is retried (exit 1), not reported as a bad config (exit 2)."""
    import transformers

    def gpu_failure(*_, **__):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", gpu_failure)
    with pytest.raises(RuntimeError, match="CUDA error"):
        load_model(ModelConfig(name_or_path=str(tiny_model)), "fp32", "sdpa")


def test_truncated_weights_exit_2_without_a_traceback(truncated_model, qa_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"nameOrPath": str(truncated_model)},
                "dataset": {"path": str(qa_file)},
                "checkpoints": {"dir": str(tmp_path / "ckpt")},
                "output": {"dir": str(tmp_path / "out")},
            }
        )
    )
    # cwd: relative defaults (dataset.preparedDir) land in tmp_path, not in the checkout
    proc = kubetune_train("run", str(config), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"{truncated_model / 'model.safetensors'} is unreadable" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("files", "weights"),
    [
        (["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"], "*.safetensors"),
        (["config.json", "pytorch_model-00001-of-00002.bin", "tokenizer.model"], "*.bin"),
    ],
)
def test_prepare_fetches_one_copy_of_the_weights(files, weights):
    from kubetune_trainer.model import download_patterns

    patterns = download_patterns(files, trust_remote_code=False)
    (other,) = {"*.safetensors", "*.bin"} - {weights}
    assert weights in patterns and other not in patterns, "one copy of the weights, not both"
    assert "*.json" in patterns and "*.py" not in patterns
    assert "*.py" in download_patterns(files, trust_remote_code=True)
