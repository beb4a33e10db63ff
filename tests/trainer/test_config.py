"""TrainConfig: defaults, both key spellings, overrides, and error messages that name file, line and setting."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from pydantic import BaseModel

from kubetune_trainer.config import (
    TrainConfig,
    apply_overrides,
    iter_fields,
    load_config,
    parse_config,
    steps_per_epoch,
)
from kubetune_trainer.errors import ConfigError

MINIMAL = "model:\n  nameOrPath: /models/tiny\ndataset:\n  path: data.jsonl\n"


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    found = [model]
    for field in model.model_fields.values():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += _models(field.annotation)
    return found


def test_every_field_has_a_description():
    for model in _models(TrainConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_defaults_fill_everything_but_model_and_data():
    cfg = parse_config(MINIMAL)
    assert cfg.lora.target_modules == ["all-linear"]
    assert parse_config(MINIMAL + "lora:\n  targetModules: q_proj\n").lora.target_modules == ["q_proj"]
    assert cfg.training.lr_scheduler == "cosine"
    assert cfg.training.warmup_ratio > 0
    assert (cfg.dataset.validation_split, cfg.dataset.test_split) == (0.1, 0.1)
    assert cfg.training.precision == "auto"


def test_camel_and_snake_case_are_both_accepted():
    camel = parse_config(MINIMAL + "training:\n  learningRate: 0.001\n  maxSteps: 5\n")
    snake = parse_config(MINIMAL + "training:\n  learning_rate: 0.001\n  max_steps: 5\n")
    assert camel == snake
    assert camel.training.learning_rate == 0.001


def test_resolved_yaml_round_trips_in_camel_case():
    cfg = parse_config(MINIMAL + "lora:\n  r: 4\n  modulesToSave: [lm_head]\n")
    text = cfg.to_yaml()
    assert "learningRate:" in text and "learning_rate" not in text
    assert parse_config(text) == cfg


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("training:\n  learningrate: 0.1\n", ["line 6", "training.learningrate", "unknown setting", "learningRate"]),
        ("lora:\n  rank: 8\n", ["line 6", "lora.rank", "unknown setting"]),
        ("training:\n  batchSize: many\n", ["line 6", "training.batchSize", "valid integer", "'many'"]),
        ("training:\n  learningRate: -1\n", ["line 6", "training.learningRate", "greater than 0"]),
        ("dataset2: {}\n", ["line 5", "dataset2", "unknown setting", "dataset"]),
        ("training:\n  precision: fp8\n", ["line 6", "training.precision", "'auto', 'bf16', 'fp16' or 'fp32'"]),
    ],
)
def test_bad_settings_name_the_line_and_the_setting(snippet, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(MINIMAL + snippet, source="run.yaml")
    message = str(err.value)
    assert message.startswith("Invalid configuration in run.yaml:")
    for part in expected:
        assert part in message


def test_unknown_dataset_format_lists_the_choices():
    with pytest.raises(ConfigError, match=r"line 5, dataset\.format: .*'prompt_completion', 'chat' or 'text'"):
        parse_config(MINIMAL + "  format: sharegpt\n")


def test_missing_required_section():
    with pytest.raises(ConfigError, match=r"dataset: required setting is missing"):
        parse_config("model:\n  nameOrPath: x\n")


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="leaves no rows for training"):
        parse_config(MINIMAL + "  validationSplit: 0.5\n  testSplit: 0.5\n")
    with pytest.raises(ConfigError, match="earlyStoppingPatience needs a validation split"):
        parse_config(MINIMAL + "  validationSplit: 0\nevaluation:\n  earlyStoppingPatience: 2\n")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL + "training:\n  learningRate: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: not valid YAML"):
        load_config(path)


def test_a_key_given_twice_is_named_with_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(MINIMAL + "training:\n  learningRate: 1e-4\n  epochs: 2\n  learningRate: 3e-4\n")
    first = MINIMAL.count("\n") + 2
    with pytest.raises(
        ConfigError, match=rf"{path}:{first + 2}: .*key 'learningRate' appears twice \(first on line {first}\)"
    ):
        load_config(path)


def test_yaml_merge_keys_still_work_and_keys_that_are_lists_are_named(tmp_path):
    cfg = parse_config(MINIMAL + "lora:\n  <<: &base {r: 4, alpha: 8}\n  r: 16\n")
    assert (cfg.lora.r, cfg.lora.alpha) == (16, 8), "a key beside a merge overrides the merged one"
    with pytest.raises(ConfigError, match=r"cfg.yaml:\d+: .*key 'r' appears twice"):
        parse_config(MINIMAL + "lora: {r: 4, r: 8}\n", source="cfg.yaml")
    with pytest.raises(ConfigError, match=r"cfg.yaml:\d+: not valid YAML \(found unhashable key\)"):
        parse_config(MINIMAL + "? [a, b]\n: 1\n", source="cfg.yaml")


def test_a_config_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "utf16.yaml"
    path.write_text(MINIMAL, encoding="utf-16")  # as PowerShell's Out-File writes it
    with pytest.raises(ConfigError, match=rf"{path}:1: not UTF-8 text .*Save the config as UTF-8"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="Config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_must_be_a_mapping():
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config("- a\n- b\n")


def test_overrides_set_values_in_either_spelling_without_duplicating_keys():
    raw = {"training": {"learningRate": 0.1}, "model": {"nameOrPath": "m"}}
    out = apply_overrides(raw, ["training.learning_rate=1e-4", "lora.targetModules=[q_proj, v_proj]"])
    assert out["training"] == {"learningRate": "1e-4"}  # YAML 1.1 reads 1e-4 as text; pydantic parses it
    assert out["lora"]["targetModules"] == ["q_proj", "v_proj"]
    assert raw["training"]["learningRate"] == 0.1, "the input is not mutated"
    cfg = parse_config(MINIMAL, overrides=["training.learning_rate=1e-4"])
    assert cfg.training.learning_rate == pytest.approx(1e-4)


def test_bad_override_is_named_as_such():
    with pytest.raises(ConfigError, match=r"--set training.batchSize=lots: training.batchSize"):
        parse_config(MINIMAL, overrides=["training.batchSize=lots"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_config(MINIMAL, overrides=["training.batchSize"])


def test_iter_fields_covers_every_leaf_with_camel_case_paths():
    paths = {path for path, *_ in iter_fields()}
    assert {"model.nameOrPath", "training.learningRate", "lora.targetModules", "output.dir"} <= paths
    assert all("_" not in p for p in paths)


@pytest.mark.parametrize(
    ("rows", "batch", "accum", "expected"),
    [(100, 8, 1, 13), (100, 8, 4, 4), (64, 8, 8, 1), (8, 8, 1, 1), (1, 8, 4, 1)],
)
def test_steps_per_epoch_matches_trainer_rounding(rows, batch, accum, expected):
    cfg = parse_config(MINIMAL + f"training:\n  batchSize: {batch}\n  gradientAccumulationSteps: {accum}\n")
    assert steps_per_epoch(rows, cfg.training) == expected


def test_config_module_imports_no_torch():
    """The operator imports the config; it must not drag torch or transformers along."""
    code = textwrap.dedent(
        """
        import sys
        import kubetune_trainer, kubetune_trainer.config
        heavy = {"torch", "transformers", "datasets", "peft"} & set(sys.modules)
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("dirs", "ok"),
    [
        ({"output": "out", "checkpoints": "ckpt", "prepared": "prep"}, True),
        ({"output": "run", "checkpoints": "run", "prepared": "prep"}, False),
        ({"output": "run/output", "checkpoints": "run/checkpoints", "prepared": "run/prepared"}, True),
        ({"output": "out", "checkpoints": "ckpt", "prepared": "out/prepared"}, False),
        ({"output": "./out", "checkpoints": "out", "prepared": "p"}, False),
        ({"output": "work", "checkpoints": "work/ckpt", "prepared": "p"}, False),
    ],
)
def test_working_directories_may_not_overlap(dirs, ok):
    text = (
        MINIMAL + f"  preparedDir: {dirs['prepared']}\noutput:\n  dir: {dirs['output']}\n"
        f"checkpoints:\n  dir: {dirs['checkpoints']}\n"
    )
    if ok:
        parse_config(text)
    else:
        with pytest.raises(ConfigError, match="must be separate directories, neither inside the other"):
            parse_config(text)
