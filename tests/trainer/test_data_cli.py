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
