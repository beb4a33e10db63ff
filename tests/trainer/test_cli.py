"""`kubetune-train` as a user runs it: a real process, its exit code, what it prints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kubetune_trainer.contract import TERMINATION_LOG_ENV
from tests.conftest import kubetune_train, write_jsonl


@pytest.fixture
def config_file(tmp_path, tiny_model, qa_file):
    def write(raw: dict | None = None, text: str | None = None) -> Path:
        path = tmp_path / "run.yaml"
        if text is None:
            base = {
                "model": {"nameOrPath": str(tiny_model)},
                "dataset": {"path": str(qa_file), "maxSeqLength": 64, "preparedDir": str(tmp_path / "prepared")},
                "training": {"maxSteps": 8, "batchSize": 8, "learningRate": 3e-3, "loggingSteps": 2},
                "checkpoints": {"dir": str(tmp_path / "ckpt")},
                "output": {"dir": str(tmp_path / "out")},
            }
            for section, values in (raw or {}).items():
                base.setdefault(section, {}).update(values)
            text = yaml.safe_dump(base, sort_keys=False)
        path.write_text(text)
        return path

    return write


def test_run_trains_and_logs_plain_progress_lines_off_a_terminal(config_file, tmp_path):
    proc = kubetune_train("run", str(config_file()), "--set", "training.maxSteps=6")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"step 4/6 \(67%\) epoch [\d.]+ loss \d+\.\d{4} lr [\d.e+-]+ tok/s [\d,]+ eta \d+s", proc.stderr)
    assert re.search(r"step 6/6 eval_loss \d+\.\d{4}", proc.stderr)
    assert "\r" not in proc.stderr, "no progress bar redraws in a log file"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["global_step"] == 6


def test_fields_lists_the_settings():
    proc = kubetune_train("fields", "training")
    assert proc.returncode == 0
    assert "training.learningRate  (float, default 0.0002)" in proc.stdout
    assert "model.nameOrPath" not in proc.stdout


BAD_INPUTS = {
    "misspelt key": (
        {"training": {"learningrate": 0.1}},
        r"line \d+, training\.learningrate: unknown setting; did you mean 'learningRate'\?",
    ),
    "wrong type": ({"training": {"batchSize": "eight"}}, r"training\.batchSize: Input should be a valid integer"),
    "unknown format": ({"dataset": {"format": "alpaca"}}, r"dataset\.format: Input should be 'auto'"),
    "missing data file": ({"dataset": {"path": "/nonexistent/train.jsonl"}}, r"dataset\.path: file not found"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_config_exits_2_with_a_message_and_no_traceback(config_file, case):
    raw, pattern = BAD_INPUTS[case]
    proc = kubetune_train("run", str(config_file(raw)))
    assert proc.returncode == 2, proc.stderr
    assert re.search(pattern, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr


def test_data_line_without_the_field_names_file_and_line(config_file, tmp_path, qa_rows):
    rows = [dict(r) for r in qa_rows]
    rows[9].pop("prompt")
    data = write_jsonl(tmp_path / "broken.jsonl", rows)
    proc = kubetune_train("run", str(config_file({"dataset": {"path": str(data)}})))
    assert proc.returncode == 2
    assert f"{data}:10: field 'prompt' is missing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_single_int_at_line_51_exits_2_naming_that_line(config_file, tmp_path):
    rows = [{"prompt": f"Routing code of branch {i}?", "completion": f" 4998588{i:02d}"} for i in range(100)]
    rows[50]["completion"] = 499858850
    data = write_jsonl(tmp_path / "codes.jsonl", rows)
    proc = kubetune_train("run", str(config_file({"dataset": {"path": str(data)}})))
    assert proc.returncode == 2, proc.stderr
    assert f"{data}:51: field 'completion' must be a string, found int" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_make_qa_names_the_record_that_lacks_or_empties_a_template_field(tmp_path):
    from kubetune_trainer.quickstart import write_templates

    write_templates(tmp_path / "t.yaml")  # its templates use branch, city and routing_code
    rows = [{"branch": f"B{i}", "city": "Ash", "routing_code": f"{i:09d}"} for i in range(5)]
    del rows[3]["city"]  # JSONL records need not share keys; the fourth lacks one a template uses
    write_jsonl(tmp_path / "r.jsonl", rows)
    (tmp_path / "r.csv").write_text("branch,city,routing_code\nB0,Ash,000000000\nB1,,000000001\n")
    for records, where, why in (("r.jsonl", "r.jsonl:4", "missing"), ("r.csv", "r.csv:3", "empty")):
        proc = kubetune_train("make-qa", records, "--template", "t.yaml", "--out", "qa", cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert f"{where}: field 'city' is {why}, and template 'natural' uses it" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "qa").exists(), "nothing written"


def test_empty_split_exits_2(config_file, tmp_path, qa_rows):
    data = write_jsonl(tmp_path / "small.jsonl", qa_rows[:3])
    proc = kubetune_train("run", str(config_file({"dataset": {"path": str(data)}})))
    assert proc.returncode == 2
    assert "validation split is empty" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unwritable_checkpoints_dir_fails_preflight_with_exit_3(config_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = kubetune_train("run", str(config_file({"checkpoints": {"dir": str(blocker / "ckpt")}})))
    assert proc.returncode == 3, proc.stderr  # the volume, not the config: exit 3
    assert f"disk.checkpoints: checkpoints.dir={blocker / 'ckpt'} is not writable" in proc.stderr
    assert proc.stderr.count("disk.checkpoints") == 1, "said once"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_an_output_dir_that_is_a_file_fails_preflight_and_keeps_the_file(config_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = kubetune_train("preflight", str(config_file({"output": {"dir": str(blocker)}})))
    assert proc.returncode == 3, proc.stderr
    assert f"disk.output: output.dir={blocker} is not writable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert blocker.read_text() == "not a directory"


def test_help_lists_the_exit_codes():
    proc = kubetune_train("--help")
    assert proc.returncode == 0
    for line in (
        "2    invalid configuration, or a dataset that cannot be read",
        "3    a preflight check failed",
        "75   ",
    ):
        assert line in proc.stdout
    preflight = kubetune_train("preflight", "--help")
    assert "3 when a check failed, 2 when the dataset cannot be read" in " ".join(preflight.stdout.split())


def test_missing_config_file_exits_2(tmp_path):
    proc = kubetune_train("run", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2
    assert "Config file not found" in proc.stderr


@pytest.mark.slow
def test_quickstart_learns_and_shows_it(tmp_path):
    """The README's main command, exactly as a newcomer runs it."""
    proc = kubetune_train("quickstart", "--dir", "qs", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "qs" / "output"
    metrics = json.loads((out / "metrics.json").read_text())
    report = json.loads((out / "eval.json").read_text())
    assert metrics["train_loss_last"] < 0.2 * metrics["train_loss_first"]
    history = json.loads((out / "log_history.json").read_text())
    assert metrics["eval_loss"] < 0.2 * history[0]["eval_loss"], "validation loss fell from the step-0 evaluation"
    # Held-out answers moved toward the references: the base model's next to the fine-tuned one's.
    base, tuned = report["base"], report["finetuned"]
    assert tuned["exact_match"] >= base["exact_match"] + 0.3
    assert tuned["cer"] < base["cer"] - 0.5
    assert "base:" in proc.stdout
    assert "fine-tuned:" in proc.stdout
    assert "(exact)" in proc.stdout
    assert (out / "adapter_model.safetensors").is_file()
    # The config it wrote is a normal config: `kubetune-train run` accepts it.
    from kubetune_trainer.config import load_config

    assert load_config(tmp_path / "qs" / "config.yaml").output.dir == "qs/output"


def test_a_failure_leaves_its_reason_and_message_for_kubernetes(config_file, tmp_path):
    log = tmp_path / "termination-log"
    proc = kubetune_train(
        "run", str(config_file({"training": {"batchSize": "eight"}})), env={TERMINATION_LOG_ENV: str(log)}
    )
    assert proc.returncode == 2
    message = json.loads(log.read_text())
    assert message["reason"] == "InvalidSpec"
    assert "training.batchSize: Input should be a valid integer" in message["message"]
