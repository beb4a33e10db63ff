"""Preflight: each check's verdict and message, the report, and `prepare`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.model import Hardware
from kubetune_trainer.preflight import (
    Check,
    ModelInfo,
    Report,
    check_disk,
    check_duplicates,
    check_gpu,
    check_learning_rate,
    check_lengths,
    check_memory,
    check_splits,
    check_steps,
    estimate_memory,
    model_info,
)
from tests.conftest import kubetune_train
from tests.trainer.test_sinks import Recorder

GiB = 1 << 30
QWEN_05B = ModelInfo(parameters=494_000_000, trainable=8_800_000, hidden_size=896, layers=24, vocab_size=151_936)


@pytest.mark.parametrize(("lr", "status"), [(2e-4, "pass"), (5e-2, "warn"), (1e-8, "warn")])
def test_learning_rate(lr, status):
    assert check_learning_rate(lr).status == status


@pytest.mark.parametrize(
    ("overrides", "rows", "statuses", "text"),
    [
        ({}, 100, ["pass", "pass"], "39 optimizer steps (13 per epoch)"),
        ({"maxSteps": 10, "warmupSteps": 10}, 100, ["pass", "fail"], "warmup (10 steps) is not shorter than the run"),
        ({"maxSteps": 1}, 100, ["pass", "pass"], "0 warmup steps of 1"),  # a ratio never takes the whole run
        ({"maxSteps": 5, "warmupSteps": 7}, 100, ["pass", "fail"], "lower training.warmupSteps or warmupRatio"),
        ({}, 0, ["fail", "pass"], "0 training rows give no optimizer step; add data or lower training.batchSize"),
        ({"maxSteps": 5}, 0, ["fail", "pass"], "0 training rows give no optimizer step"),
    ],
)
def test_steps_and_warmup(make_config, overrides, rows, statuses, text):
    cfg = make_config(**{f"training.{k}": v for k, v in {"maxSteps": None, **overrides}.items()})
    checks = check_steps(cfg, rows)
    assert [c.status for c in checks] == statuses
    assert any(text in c.message for c in checks)
    assert not any(c.input_error for c in checks), "a failed check exits 3 (PreflightFailed)"


@pytest.mark.parametrize(
    ("hw", "expect", "name", "status", "text"),
    [
        (Hardware(cuda=False), 0, "gpu.cuda", "pass", "training on CPU"),
        (Hardware(cuda=False), 1, "gpu.cuda", "fail", "1 GPU(s) requested but CUDA sees none"),
        (Hardware(cuda=True, device_count=1, device_name="H100"), 2, "gpu.count", "fail", "2 GPU(s) requested, 1"),
        (Hardware(cuda=True, device_count=2, device_name="H100"), 2, "gpu.count", "pass", "2 x H100"),
    ],
)
def test_gpu(hw, expect, name, status, text):
    (check,) = check_gpu(hw, expect)
    assert (check.name, check.status) == (name, status)
    assert text in check.message
    assert not check.input_error, "a missing GPU is the cluster's problem, not the config's"


def test_memory_estimate_follows_the_settings():
    base = estimate_memory(QWEN_05B, precision="bf16", batch_size=4, seq_len=1024, gradient_checkpointing=False)
    ckpt = estimate_memory(QWEN_05B, precision="bf16", batch_size=4, seq_len=1024, gradient_checkpointing=True)
    fp32 = estimate_memory(QWEN_05B, precision="fp32", batch_size=4, seq_len=1024, gradient_checkpointing=False)
    assert ckpt["activations"] < base["activations"] / 5
    assert fp32["weights"] == 2 * base["weights"]
    resident = base["weights"] + base["adapter_and_optimizer"] + base["runtime"]
    assert base["total"] == resident + base["activations"] + base["logits"], "an eval batch as large weighs less"
    assert 5 * GiB < base["total"] < 40 * GiB  # a 0.5B model, batch 4 x 1024 tokens


def test_an_evaluation_batch_counts_only_when_there_is_data_to_evaluate():
    from types import SimpleNamespace

    from kubetune_trainer.config import TrainConfig
    from kubetune_trainer.preflight import _estimate

    cfg = TrainConfig.model_validate(
        {"model": {"nameOrPath": "m"}, "dataset": {"path": "d.jsonl"}, "evaluation": {"batchSize": 64}}
    )
    lengths = {"train": SimpleNamespace(max_length=1024)}

    def estimate(splits: dict) -> dict[str, int]:
        pf = SimpleNamespace(model_info=QWEN_05B, precision="bf16", data=SimpleNamespace(stats={**lengths, **splits}))
        return _estimate(cfg, pf)

    with_validation = estimate({"validation": SimpleNamespace(max_length=1024)})
    assert with_validation["eval_logits"] > with_validation["logits"], "evaluation.batchSize 64 counts"
    alone = estimate({})  # no validation or test split: the evaluation batch is never made
    assert alone["total"] < with_validation["total"] and alone["eval_logits"] <= alone["logits"]


def test_memory_estimate_counts_a_larger_evaluation_batch():
    args = {"precision": "bf16", "batch_size": 4, "seq_len": 1024, "gradient_checkpointing": True}
    same = estimate_memory(QWEN_05B, **args)
    big = estimate_memory(QWEN_05B, **args, eval_batch_size=64)
    assert big["eval_logits"] == 16 * same["logits"]
    resident = big["weights"] + big["adapter_and_optimizer"] + big["runtime"]
    assert big["total"] == resident + big["eval_activations"] + big["eval_logits"] > same["total"]
    check = check_memory(big, free=big["total"] - 1, total=big["total"] * 2)
    assert check.status == "fail"
    assert "largest part: eval_logits); lower evaluation.batchSize or dataset.maxSeqLength" in check.message


@pytest.mark.parametrize(
    ("free", "status", "text"),
    [
        (80 * GiB, "pass", "needs about"),
        (int(10.5 * GiB), "warn", "little headroom"),
        (2 * GiB, "fail", "lower training.batchSize or dataset.maxSeqLength, or set training.gradientCheckpointing"),
    ],
)
def test_memory(free, status, text):
    estimate = {"weights": 1 * GiB, "activations": 8 * GiB, "total": 9 * GiB}
    check = check_memory(estimate, free, 80 * GiB)
    assert check.status == status
    assert text in check.message
    if status == "fail":
        assert "largest part: activations" in check.message


@pytest.mark.parametrize(
    ("free", "writable", "status", "text"),
    [
        (None, "Permission denied", "fail", "is not writable (Permission denied)"),
        (50, None, "fail", "at least"),
        (150, None, "warn", "may fill up"),
        (500, None, "pass", "free"),
    ],
)
def test_disk(free, writable, status, text):
    check = check_disk(
        "disk.checkpoints", "checkpoints.dir", Path("/ws/ckpt"), minimum=100, want=400, free=free, writable=writable
    )
    assert check.status == status
    assert text in check.message
    assert status == "pass" or "checkpoints.dir=/ws/ckpt" in check.message


def test_lengths_warn_when_many_samples_are_cut():
    stats = {
        "train": {"rows": 90, "dropped": 10, "truncated": 30, "p50_length": 500, "p95_length": 1024, "max_length": 1024}
    }
    check = check_lengths(stats, 1024)
    assert check.status == "warn"
    assert "30% of samples are cut at dataset.maxSeqLength=1024" in check.message


def test_splits():
    ok = {"train": {"rows": 100}, "validation": {"rows": 20}}
    assert [c.status for c in check_splits(ok, batch=8, eval_batch=8)] == ["pass"]
    small = {"train": {"rows": 5}, "validation": {"rows": 3}}
    checks = check_splits(small, batch=8, eval_batch=8)
    assert [c.status for c in checks] == ["fail", "warn"]
    assert "fewer than one batch of 8" in checks[0].message


def test_duplicates():
    check = check_duplicates(["a", "b", "a", "c", "a"])
    assert check.status == "warn"
    assert "2 of 5 training rows repeat another (e.g. rows 0, 2, 4)" in check.message


def test_a_failed_report_says_only_what_failed_and_how_many_warnings():
    report = Report(
        [
            Check("config.learning_rate", "warn", "high"),
            Check("disk.output", "pass", "fine"),
            Check("gpu.cuda", "fail", "1 GPU(s) requested but CUDA sees none"),
            Check("dataset.splits", "warn", "small"),
        ]
    )
    text = report.summary()
    assert text.startswith("Preflight failed (1 of 4 checks failed, 2 warnings; -v or output/preflight.json")
    assert "  gpu.cuda: 1 GPU(s) requested but CUDA sees none" in text
    assert "disk.output" not in text and "config.learning_rate" not in text


def test_report_exit_codes():
    report = Report([Check("x", "pass", ""), Check("y", "warn", "")])
    assert report.exit_code() == 0
    report.add(Check("gpu.cuda", "fail", "no GPU"))
    assert report.exit_code() == 3
    report.add(Check("config.warmup", "fail", "warmup too long"))
    assert report.exit_code() == 3, "a failed check of the config is a failed preflight too"
    report.add(Check("dataset", "fail", "x.jsonl:3: field 'prompt' is missing", input_error=True))
    assert report.exit_code() == 2, "an unreadable dataset is an invalid configuration"
    assert json.loads(json.dumps(report.to_dict()))["passed"] is False


def test_model_info_matches_the_real_adapter(make_config):
    from kubetune_trainer.model import apply_lora, load_model, parameter_counts

    cfg = make_config(**{"lora.modulesToSave": ["lm_head"]})
    info = model_info(cfg)
    real = apply_lora(load_model(cfg.model, "fp32", "sdpa"), cfg.lora, gradient_checkpointing=False)
    trainable, total = parameter_counts(real)
    assert info.trainable == trainable
    assert info.parameters == total - trainable  # the base; modules_to_save are trainable copies
    assert (info.hidden_size, info.layers) == (64, 2)


def _write(tmp_path, raw) -> Path:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def raw_config(tmp_path, tiny_model, qa_file):
    return {
        "model": {"nameOrPath": str(tiny_model)},
        "dataset": {"path": str(qa_file), "maxSeqLength": 64, "preparedDir": str(tmp_path / "prepared")},
        "training": {"maxSteps": 4, "batchSize": 8},
        "checkpoints": {"dir": str(tmp_path / "ckpt")},
        "output": {"dir": str(tmp_path / "out")},
    }


def test_preflight_command_reports_json(tmp_path, raw_config):
    proc = kubetune_train("preflight", str(_write(tmp_path, raw_config)), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] is True
    names = {c["name"] for c in report["checks"]}
    assert {"model.config", "dataset.lengths", "disk.checkpoints", "gpu.cuda", "config.warmup"} <= names
    lengths = next(c for c in report["checks"] if c["name"] == "dataset.lengths")
    assert lengths["data"]["max_length"] <= 64


def test_preflight_without_the_requested_gpu_exits_3(tmp_path, raw_config):
    config = str(_write(tmp_path, raw_config))
    proc = kubetune_train("preflight", config, "--expect-gpus", "1")
    assert proc.returncode == 3
    # One paragraph: the failed check, once; the table only with -v.
    assert proc.stdout == ""
    assert proc.stderr.count("gpu.cuda") == 1, proc.stderr
    assert "kubetune-train: error: Preflight failed (1 of " in proc.stderr
    assert "gpu.cuda: 1 GPU(s) requested but CUDA sees none" in proc.stderr
    assert "PASS" not in proc.stderr
    report = json.loads((tmp_path / "out" / "preflight.json").read_text())
    assert report["passed"] is False

    verbose = kubetune_train("preflight", config, "--expect-gpus", "1", "-v")
    assert verbose.returncode == 3
    assert "FAIL  gpu.cuda" in verbose.stdout
    assert "PASS  model.config" in verbose.stdout


def test_a_broken_model_still_gets_its_disk_checks(tmp_path, raw_config):
    raw_config["model"]["nameOrPath"] = str(tmp_path / "no-such-model")
    proc = kubetune_train("preflight", str(_write(tmp_path, raw_config)), "--json")
    assert proc.returncode == 3, proc.stderr  # the model check failed: PreflightFailed
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["model.config"]["status"] == "fail"
    assert checks["disk.checkpoints"]["message"].startswith("skipped: needs the model config; checkpoints.dir=")
    assert "is writable" in checks["disk.checkpoints"]["message"]
    assert checks["disk.checkpoints"]["data"]["skipped"] is True
    assert checks["dataset"]["message"].startswith("skipped: needs the tokenizer")
    assert checks["gpu.cuda"]["status"] == "pass"

    raw_config["checkpoints"]["dir"] = str(tmp_path / "run.yaml" / "ckpt")  # under a file: cannot be created
    proc = kubetune_train("preflight", str(_write(tmp_path, raw_config)), "--json")
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["disk.checkpoints"]["status"] == "fail"
    assert "is not writable" in checks["disk.checkpoints"]["message"]


def test_run_refuses_a_chat_dataset_without_chat_template(tmp_path, raw_config, tiny_model, qa_rows):
    import shutil

    from tests.conftest import write_jsonl

    model = tmp_path / "no-template"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in qa_rows
        ],
    )
    raw_config["model"]["nameOrPath"] = str(model)
    raw_config["dataset"]["path"] = str(chat)
    proc = kubetune_train("run", str(_write(tmp_path, raw_config)))
    assert proc.returncode == 3
    assert "model.chat_template: dataset.format is chat, but the model's tokenizer has no chat template" in proc.stderr
    report = json.loads((tmp_path / "out" / "preflight.json").read_text())
    assert report["passed"] is False


def test_prepare_reports_the_preflight_to_the_run_and_closes_its_sinks(tmp_path, raw_config, monkeypatch):
    from kubetune_trainer import sinks
    from kubetune_trainer.cli import build_parser
    from kubetune_trainer.errors import PreflightError

    recorder = Recorder()
    monkeypatch.setattr(sinks, "default_sinks", lambda cfg: [recorder])
    raw_config["training"]["warmupSteps"] = 10  # not shorter than the 4 steps: the preflight fails
    args = build_parser().parse_args(["prepare", str(_write(tmp_path, raw_config))])
    with pytest.raises(PreflightError, match=r"config\.warmup: warmup"):
        args.func(args)
    (report,) = recorder.of("preflight")
    assert report["passed"] is False
    assert any(c["name"] == "config.warmup" and c["status"] == "fail" for c in report["checks"])
    assert recorder.closed


def test_prepare_saves_the_tokenized_data_that_run_reuses(tmp_path, raw_config, qa_file):
    config = _write(tmp_path, raw_config)
    proc = kubetune_train("prepare", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "Saved the prepared data to" in proc.stderr
    assert (tmp_path / "prepared" / "prepared.json").is_file()
    assert (tmp_path / "out" / "preflight.json").is_file()

    proc = kubetune_train("run", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "Using the prepared data in" in proc.stderr
    assert "Tokeniz" not in proc.stderr

    # Changed data makes the prepared copy stale: the run tokenizes again instead of training on old data.
    qa_file.write_text(
        qa_file.read_text() + json.dumps({"prompt": "Question: new?\nAnswer:", "completion": " x"}) + "\n"
    )
    raw_config["output"]["dir"] = str(tmp_path / "out2")
    raw_config["checkpoints"]["dir"] = str(tmp_path / "ckpt2")
    proc = kubetune_train("run", str(_write(tmp_path, raw_config)))
    assert proc.returncode == 0, proc.stderr
    assert "is stale" in proc.stderr
