"""Real LoRA training of a tiny locally built model on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kubetune_trainer.errors import ConfigError, OtherRunError, PreflightError
from kubetune_trainer.train import ValidationTracker, finish, run, setup, train


def _is_adapter(name: str) -> bool:
    return "lora_" in name or "modules_to_save" in name


def test_lora_trains_the_adapter_and_leaves_the_base_alone(make_config):
    recipe = setup(make_config(**{"training.maxSteps": 12}), sinks=[])
    model = recipe.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(_is_adapter(n) for n in before)

    output = recipe.trainer.train()

    after = dict(model.named_parameters())
    base = [n for n in before if not _is_adapter(n)]
    lora_b = [n for n in before if "lora_B" in n]
    assert base and lora_b
    for name in base:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=f"base weight {name} changed")
    changed = [n for n in lora_b if not torch.equal(after[n], before[n])]
    assert changed == lora_b, "every LoRA B matrix (zero at init) must have moved"

    losses = [h["loss"] for h in recipe.trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, f"loss did not fall: {losses}"

    result = finish(recipe, output.metrics)
    assert result.metrics["global_step"] == 12
    assert math.isfinite(result.metrics["eval_loss"]) and math.isfinite(result.metrics["test_loss"])


def test_run_exports_a_loadable_adapter_and_reports(make_config, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = make_config(**{"training.maxSteps": 6, "evaluation.evalSteps": 3})
    result = run(cfg, sinks=[])
    out = result.output_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert (out / "config.yaml").read_text() == cfg.to_yaml()

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 6
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["data"]["format"] == "prompt_completion"
    assert metrics["tokens_per_second"] > 0
    assert not list(out.glob(".export-*")), "no staging directory is left behind"

    png = (out / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(out / "loss_curves.png").shape
    assert width > 400 and height > 200

    # Evaluated at the start, every 3 steps and at the end: the curve has its points.
    eval_steps = [h["step"] for h in result.log_history if "eval_loss" in h]
    assert eval_steps == [0, 3, 6]

    # The exported adapter reproduces the validation loss of the model it came from.
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, out).eval()
    batch = tokenizer(["Question: Which branch has routing code 1?\nAnswer: Oak Plaza"], return_tensors="pt")
    with torch.no_grad():
        loss = loaded(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss)
    assert loss.item() < json.loads((out / "log_history.json").read_text())[0]["eval_loss"] + 5  # sanity


def _config(**overrides):
    from kubetune_trainer.config import TrainConfig, apply_overrides

    raw = {"model": {"nameOrPath": "m"}, "dataset": {"path": "d.jsonl"}, "checkpoints": {"dir": "/tmp/ckpt"}}
    return TrainConfig.model_validate(apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {},
            {
                "lr_scheduler_type": "cosine",
                "warmup_steps": 3,  # 3% of 100 steps
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
                "gradient_accumulation_steps": 1,
                "per_device_train_batch_size": 8,
                "per_device_eval_batch_size": 8,
                "learning_rate": 2e-4,
                "num_train_epochs": 3.0,
                "max_steps": -1,
                "seed": 42,
                "data_seed": 42,
                "logging_steps": 10,
            },
        ),
        (
            {
                "training.lrScheduler": "linear",
                "training.warmupSteps": 7,
                "training.weightDecay": 0.1,
                "training.maxGradNorm": 0.5,
                "training.gradientAccumulationSteps": 4,
                "training.batchSize": 2,
                "evaluation.batchSize": 16,
                "training.learningRate": 1e-3,
                "training.maxSteps": 100,
                "training.seed": 7,
                "training.loggingSteps": 5,
            },
            {
                "lr_scheduler_type": "linear",
                "warmup_steps": 7,
                "weight_decay": 0.1,
                "max_grad_norm": 0.5,
                "gradient_accumulation_steps": 4,
                "per_device_train_batch_size": 2,
                "per_device_eval_batch_size": 16,
                "learning_rate": 1e-3,
                "max_steps": 100,
                "seed": 7,
                "data_seed": 7,
                "logging_steps": 5,
            },
        ),
        ({"training.lrScheduler": "constant_with_warmup", "training.warmupRatio": 0.25}, {"warmup_steps": 25}),
        ({"training.lrScheduler": "constant", "training.warmupRatio": 0}, {"warmup_steps": 0}),
        ({"training.maxGradNorm": 0}, {"max_grad_norm": 0.0}),  # clipping off
    ],
    ids=["defaults", "every-setting", "warmup-ratio", "no-warmup", "no-clipping"],
)
def test_training_arguments_follow_the_config(overrides, expected):
    from kubetune_trainer.train import training_arguments

    args = training_arguments(
        _config(**overrides), precision="fp32", steps=100, has_validation=False, evaluate_first=True
    )
    got = {name: getattr(args, name) for name in expected}
    got["lr_scheduler_type"] = getattr(got.get("lr_scheduler_type"), "value", got.get("lr_scheduler_type"))
    assert {k: v for k, v in got.items() if k in expected} == expected
    # Gradient checkpointing is the model's (apply_lora, non-reentrant), never Trainer's with its own kwargs.
    assert args.gradient_checkpointing is False


@pytest.mark.parametrize(
    ("precision", "bf16", "fp16"), [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)]
)
def test_training_arguments_take_the_resolved_precision(precision, bf16, fp16):
    from kubetune_trainer.train import training_arguments

    args = training_arguments(_config(), precision=precision, steps=10, has_validation=True, evaluate_first=True)
    assert (args.bf16, args.fp16) == (bf16, fp16)
    assert args.eval_strategy == "steps" and args.eval_on_start is True


def test_early_stopping_stops_when_validation_stops_improving(make_config):
    # An improvement must beat 100 nats, so the first evaluation after the start counts as none.
    cfg = make_config(
        **{
            "training.maxSteps": 40,
            "evaluation.evalSteps": 2,
            "evaluation.earlyStoppingPatience": 1,
            "evaluation.earlyStoppingMinDelta": 100,
        }
    )
    result = run(cfg, sinks=[])
    assert result.metrics["global_step"] == 2
    assert result.metrics["early_stopped"] is True


def _evaluate_sequence(tracker, losses):
    """Feed eval losses at steps 0, 1, 2...; return the step at which training was told to stop."""
    from transformers import TrainerControl, TrainerState

    state, control = TrainerState(), TrainerControl()
    for step, loss in enumerate(losses):
        state.global_step = step
        tracker.on_evaluate(None, state, control, metrics={"eval_loss": loss})
        if control.should_training_stop:
            return step
    return None


@pytest.mark.parametrize(
    ("losses", "patience", "min_delta", "stop_at", "best_step"),
    [
        ([3.0, 2.0, 1.0, 0.5], 1, 0.0, None, 3),  # always improving
        ([3.0, 2.0, 2.5, 1.0], 1, 0.0, 2, 1),  # one bad evaluation is enough with patience 1
        ([3.0, 2.0, 2.5, 1.0], 2, 0.0, None, 3),  # patience 2 forgives it
        ([3.0, 2.9, 2.8, 2.7], 2, 0.5, 2, 0),  # gains smaller than min_delta are not improvements
        ([3.0, 3.0, 3.0], None, 0.0, None, 0),  # no patience: never stops
    ],
)
def test_early_stopping_decisions(losses, patience, min_delta, stop_at, best_step):
    tracker = ValidationTracker(patience, min_delta)
    assert _evaluate_sequence(tracker, losses) == stop_at
    assert tracker.best_step == best_step


def test_a_new_best_asks_for_a_checkpoint_except_at_step_0():
    from transformers import TrainerControl, TrainerState

    tracker, state = ValidationTracker(), TrainerState()
    for step, loss, saves in [(0, 3.0, False), (5, 2.0, True), (10, 2.5, False)]:
        state.global_step, control = step, TrainerControl()
        tracker.on_evaluate(None, state, control, metrics={"eval_loss": loss})
        assert control.should_save is saves
    assert tracker.loss_at(10) == 2.5
    assert tracker.loss_at(5) is None  # only the latest evaluation is known


def test_the_best_adapter_is_restored_from_its_checkpoint(make_config):
    from safetensors.torch import load_file

    cfg = make_config(
        **{"training.maxSteps": 8, "checkpoints.everySteps": 4, "checkpoints.keep": 5, "evaluation.evalSteps": 100}
    )
    recipe = setup(cfg, sinks=[])
    metrics = train(recipe)
    # Pretend the evaluation at step 4 had been the best (the decision itself is tested above).
    recipe.tracker.best_step, recipe.tracker.best_loss = 4, 0.5
    result = finish(recipe, metrics)
    assert result.metrics["restored_best"] is True
    exported = load_file(str(result.output_dir / "adapter_model.safetensors"))
    at_step_4 = load_file(str(Path(cfg.checkpoints.dir) / "checkpoint-4" / "adapter_model.safetensors"))
    at_step_8 = load_file(str(Path(cfg.checkpoints.dir) / "checkpoint-8" / "adapter_model.safetensors"))
    assert exported.keys() == at_step_4.keys()
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, at_step_4[name])
    assert any(not torch.equal(exported[n], at_step_8[n]) for n in exported)


def test_gradient_accumulation_and_checkpointing_train(make_config):
    steps, accumulation, batch = 3, 2, 4
    cfg = make_config(
        **{
            "training.maxSteps": steps,
            "training.batchSize": batch,
            "training.gradientAccumulationSteps": accumulation,
            "training.gradientCheckpointing": True,
            "training.groupByLength": False,
            "dataset.validationSplit": 0,
        }
    )
    recipe = setup(cfg, sinks=[])
    base = recipe.model.get_base_model()
    assert base.is_gradient_checkpointing
    samples: list[int] = []
    attention_calls: list[int] = []
    hooks = [
        recipe.model.register_forward_pre_hook(
            lambda _m, _args, kwargs: samples.append(kwargs["input_ids"].shape[0]), with_kwargs=True
        ),
        # A pre-hook: the recomputation stops early, as soon as it has what backward needs.
        base.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: attention_calls.append(1)),
    ]
    try:
        metrics = train(recipe)
    finally:
        for hook in hooks:
            hook.remove()
    result = finish(recipe, metrics)
    assert result.metrics["global_step"] == steps
    assert result.metrics["eval_loss"] is None
    micro_batches = steps * accumulation
    assert samples == [batch] * micro_batches, "samples seen = steps x accumulation x batch"
    # Checkpointed: backward runs each micro-batch's layers again to recompute their activations.
    assert len(attention_calls) == 2 * micro_batches
    assert math.isfinite(result.metrics["train_loss_last"])


def test_chat_data_trains(make_config, tmp_path, qa_rows):
    from tests.conftest import write_jsonl

    rows = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in qa_rows
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = run(make_config(**{"dataset.path": str(path), "training.maxSteps": 4}), sinks=[])
    assert result.metrics["data"]["format"] == "chat"
    assert math.isfinite(result.metrics["train_loss_last"])


def test_output_of_another_run_is_never_overwritten(make_config):
    first = make_config(**{"training.maxSteps": 2})
    run(first, sinks=[])
    adapter = Path(first.output.dir) / "adapter_model.safetensors"
    before = adapter.read_bytes()
    with pytest.raises(OtherRunError, match="already holds the adapter of another run"):  # reason VolumeHoldsOtherRun
        setup(make_config(**{"training.maxSteps": 2, "lora.r": 4}), sinks=[])  # another adapter: another run
    assert adapter.read_bytes() == before
    # The same config again is a rerun, not another run; so is one with more steps (it continues training).
    setup(first, sinks=[])
    setup(make_config(**{"training.maxSteps": 3}), sinks=[])


def test_bf16_on_cpu_is_refused_with_the_setting_named(make_config):
    with pytest.raises(PreflightError, match=r"training.precision=bf16 needs a GPU"):
        setup(make_config(**{"training.precision": "bf16"}), sinks=[])


def test_unknown_target_module_lists_the_real_ones(make_config):
    with pytest.raises(
        PreflightError, match=r"model.target_modules: lora.targetModules: .*Linear layers in this model: .*q_proj"
    ):
        setup(make_config(**{"lora.targetModules": ["attn_qkv"]}), sinks=[])


def test_model_path_that_is_not_a_model(make_config, tmp_path):
    with pytest.raises(PreflightError, match=r"model.nameOrPath=.*cannot load the tokenizer"):
        setup(make_config(**{"model.nameOrPath": str(tmp_path)}), sinks=[])


def test_high_loss_samples_follow_each_evaluation(make_config):
    from kubetune_trainer.data import load_splits

    cfg = make_config(**{"training.maxSteps": 6, "evaluation.evalSteps": 2, "evaluation.highLossSamples": 3})
    result = run(cfg, sinks=[])
    rows = [json.loads(line) for line in (result.output_dir / "high_loss_samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 2, 4, 4, 4, 6, 6, 6]  # none at step 0: nothing trained yet
    _, raw = load_splits(cfg.dataset)
    for step in (2, 4, 6):
        worst = [r for r in rows if r["step"] == step]
        assert [r["loss"] for r in worst] == sorted((r["loss"] for r in worst), reverse=True)
        assert all(0 < r["loss"] < 20 for r in worst)
        for r in worst:
            row = raw["train"][r["index"]]
            assert r["text"] == row["prompt"] + row["completion"] + "<|endoftext|>"


def test_a_finished_run_is_not_exported_under_other_settings_but_can_be_extended(make_config):
    done = make_config(**{"training.maxSteps": 6})
    run(done, sinks=[])
    with pytest.raises(ConfigError, match=r"holds a finished run trained with other training.learningRate"):
        setup(
            make_config(
                **{
                    "training.maxSteps": 6,
                    "training.learningRate": 1e-4,
                    "output.dir": str(Path(done.output.dir).parent / "other-out"),
                }
            ),
            sinks=[],
        )
    # More steps, as the message advises: the same run, so its own output.dir takes the longer run's export.
    longer = make_config(**{"training.maxSteps": 10})
    assert longer.output.dir == done.output.dir
    result = run(longer, sinks=[])
    assert json.loads((Path(done.output.dir) / "metrics.json").read_text())["global_step"] == 10
    assert result.metrics["resumed_from_step"] == 6
    assert result.metrics["global_step"] == 10
    steps = [h["step"] for h in result.log_history if "loss" in h]
    assert steps == list(range(1, 11)), "the first six steps come from the checkpoint's history, not retrained"


def test_a_resume_drops_the_records_of_the_steps_it_makes_again(tmp_path):
    from kubetune_trainer.report import drop_records_after

    log = tmp_path / "high_loss_samples.jsonl"
    lines = [{"step": 10, "loss": 1.0}, {"note": "no step"}, {"step": 20, "loss": 2.0}, {"step": 30, "loss": 3.0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3')  # the last line cut by a kill
    assert drop_records_after(log, 20) == 1
    assert log.read_text().splitlines() == [*(json.dumps(r) for r in lines[:3]), '{"step": 3']
    assert drop_records_after(log, 20) == 0
    assert drop_records_after(tmp_path / "absent.jsonl", 5) == 0


def test_an_output_dir_with_a_users_files_is_refused_and_left_alone(make_config):
    cfg = make_config(**{"training.maxSteps": 2})
    out = Path(cfg.output.dir)
    out.mkdir(parents=True)
    (out / "config.yaml").write_text("# my notes on this experiment\n")
    (out / "README.md").write_text("mine")
    with pytest.raises(
        ConfigError, match=r"output.dir=.* holds files kubetune did not write \(README.md, config.yaml\)"
    ):
        run(cfg, sinks=[])
    assert (out / "config.yaml").read_text() == "# my notes on this experiment\n"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml"], "nothing written there"


def test_a_half_written_save_counts_its_own_bytes_before_calling_the_volume_full(tmp_path):
    """Sparse files: a checkpoint a GiB larger than the free space, and a failed save that already wrote 2 GiB
    of it. The rest fits, so the failure is no VolumeFull (that would end the run for good, exit 5)."""
    import os
    from types import SimpleNamespace

    from kubetune_trainer import checkpoints
    from kubetune_trainer.train import _save_failed_for_space

    root = tmp_path / "ckpt"
    latest, staged = root / "checkpoint-10", root / checkpoints.STAGING / "checkpoint-20"
    for folder in (latest, staged):
        folder.mkdir(parents=True)
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    os.truncate(_touch(latest / "adapter_model.safetensors"), free + (1 << 30))
    recipe = SimpleNamespace(
        cfg=SimpleNamespace(checkpoints=SimpleNamespace(dir=str(root))),
        committer=SimpleNamespace(latest=SimpleNamespace(path=latest)),
    )
    os.truncate(_touch(staged / "adapter_model.safetensors"), 2 << 30)
    assert not _save_failed_for_space(recipe)
    os.truncate(staged / "adapter_model.safetensors", 0)  # nothing written yet: the whole checkpoint must fit
    assert _save_failed_for_space(recipe)


def _touch(path: Path) -> Path:
    path.touch()
    return path
