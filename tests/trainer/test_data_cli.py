"""Bad data through `kubetune-train run` as a user meets it: exit 2, the file and line, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import write_jsonl


def run_cli(config: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.cli", "run", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_single_int_at_line_51_exits_2_naming_that_line(tmp_path, tiny_model):
    rows = [{"prompt": f"Routing code of branch {i}?", "completion": f" 4998588{i:02d}"} for i in range(100)]
    rows[50]["completion"] = 499858850
    data = write_jsonl(tmp_path / "codes.jsonl", rows)
    proc = run_cli(
        {
            "model": {"nameOrPath": str(tiny_model)},
            "dataset": {"path": str(data)},
            "checkpoints": {"dir": str(tmp_path / "ckpt")},
            "output": {"dir": str(tmp_path / "out")},
        },
        tmp_path,
    )
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
        proc = subprocess.run(
            [sys.executable, "-m", "kubetune_trainer.cli", "make-qa", records, "--template", "t.yaml", "--out", "qa"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert f"{where}: field 'city' is {why}, and template 'natural' uses it" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "qa").exists(), "nothing written"
