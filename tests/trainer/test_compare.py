"""`kubetune compare`: two real runs side by side, from their directories and from TrainingRuns whose
status the trainer itself reported to an API server (the emulator, over HTTP)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune_trainer import compare
from kubetune_trainer.errors import ConfigError
from tests.conftest import kubetune_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model, qa_rows):
    """Two short real runs (learning rates 3e-3 and 1e-3), the second reporting to a TrainingRun's status."""
    from kubetune_trainer.config import TrainConfig
    from kubetune_trainer.sinks import KubernetesStatusSink, status_patcher
    from kubetune_trainer.train import run
    from tests.conftest import write_jsonl
    from tests.operator.emulator import ApiServer

    root = tmp_path_factory.mktemp("compare")
    data = write_jsonl(root / "qa.jsonl", qa_rows)
    server = ApiServer().start()
    kubeconfig = server.kubeconfig(root / "kubeconfig")
    runs = {}
    trainingruns = server.resource("kubetune.io", "trainingruns")
    for name, lr in (("fast", 3e-3), ("slow", 1e-3)):
        spec = {
            "model": {"nameOrPath": str(tiny_model)},
            "dataset": {"path": str(data), "maxSeqLength": 64, "testSplit": 0.2, "preparedDir": str(root / "prep")},
            "training": {"maxSteps": 6, "batchSize": 8, "learningRate": lr, "loggingSteps": 2},
            "evaluation": {"maxGenerationSamples": 8},
            "checkpoints": {"dir": str(root / name / "checkpoints")},
            "output": {"dir": str(root / name / "output")},
        }
        body = {"apiVersion": "kubetune.io/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name}, "spec": spec}
        server.call(lambda body=body: server.create(trainingruns, "ml", body))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KUBECONFIG", str(kubeconfig))
            sink = KubernetesStatusSink(lambda name=name: status_patcher("ml", name), interval=0.5)
            runs[name] = run(TrainConfig.model_validate(spec), sinks=[sink])
    yield runs, server, kubeconfig
    server.stop()


def test_compare_renders_two_output_directories_side_by_side(two_runs):
    runs, _, _ = two_runs
    rows = compare.collect([str(r.output_dir) for r in runs.values()], namespace=None, kubeconfig=None, context=None)
    assert [r.name for r in rows] == ["fast", "slow"]
    assert [r.learning_rate for r in rows] == [3e-3, 1e-3]
    for row, result in zip(rows, runs.values(), strict=True):
        assert row.steps == 6 and row.train_loss == result.metrics["train_loss_last"]
        assert row.test == pytest.approx(result.evaluation.finetuned)
        assert row.base == pytest.approx(result.evaluation.base)
    table = compare.render_table(rows).splitlines()
    assert table[0].split()[:4] == ["RUN", "MODEL", "R", "LR"] and "PHASE" not in table[0], "no column without data"
    assert table[1].split()[0] == "fast" and "3.0e-03" in table[1] and "1.0e-03" in table[2]
    base, tuned = rows[0].base["loss"], rows[0].test["loss"]
    assert f"{base:.4f}->{tuned:.4f}" in table[1], "test loss reads base->fine-tuned"
    # Duration and throughput come from the run's metrics.json: '45s' or '1m05s', thousands separators.
    for line, row, result in zip(table[1:], rows, runs.values(), strict=True):
        wall, rate = result.metrics["wall_seconds"], result.metrics["tokens_per_second"]
        assert row.duration_seconds == wall and row.tokens_per_second == rate and wall > 0 and rate > 0
        cells = dict(zip(table[0].split(), line.split(), strict=True))
        s = round(wall)
        assert cells["TIME"] == (f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s")
        assert cells["TOK/S"] == f"{rate:,.0f}"


def test_durations_read_hours_and_minutes_and_come_from_status_times():
    assert compare._seconds_between("2025-03-01T10:00:00Z", "2025-03-01T11:02:03Z") == 3723
    assert compare.format_duration(3723) == "1h02m" and compare.format_duration(65.4) == "1m05s"
    assert compare.format_duration(59.4) == "59s" and compare.format_duration(None) == "-"
    assert compare._seconds_between(None, "2025-03-01T11:02:03Z") is None


def test_compare_reads_trainingruns_through_the_kubeconfig_and_prints_json(two_runs):
    runs, server, kubeconfig = two_runs
    # The operator's share of the status (the emulator runs none): slow ran from 10:00:00 to 10:02:05.
    times = {"startTime": "2025-03-01T10:00:00Z", "completionTime": "2025-03-01T10:02:05Z"}
    trainingruns = server.resource("kubetune.io", "trainingruns")

    def set_times(obj: dict) -> dict:
        return {**obj, "status": {**obj["status"], **times}}

    server.call(lambda: server.update(trainingruns, "ml", "slow", set_times, subresource="status"))
    statuses = {name: server.call(lambda name=name: server.get(trainingruns, "ml", name))["status"] for name in runs}
    script = Path(sys.executable).with_name("kubectl-kubetune")  # what `kubectl kubetune` runs
    proc = subprocess.run(
        [str(script), "compare", "fast", "ml/slow", "-n", "ml", "--kubeconfig", str(kubeconfig), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["source"] for r in rows] == ["trainingrun/ml/fast", "trainingrun/ml/slow"]
    for row, (name, result) in zip(rows, runs.items(), strict=True):
        assert row["name"] == name and row["phase"] is None, "the emulator runs no operator: no phase"
        assert row["steps"] == 6 and row["learning_rate"] == {"fast": 3e-3, "slow": 1e-3}[name]
        assert row["test"]["exact_match"] == pytest.approx(result.evaluation.finetuned["exact_match"])
        assert row["base"]["loss"] == pytest.approx(result.evaluation.base["loss"])
        assert row["eval_loss"] == pytest.approx(result.metrics["eval_loss"])
        assert row["tokens_per_second"] == statuses[name]["progress"]["tokensPerSecond"] > 0
    assert [r["duration_seconds"] for r in rows] == [None, 125.0], "from startTime to completionTime"


def test_compare_names_what_it_cannot_find(two_runs, tmp_path):
    _, _, kubeconfig = two_runs
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("kubetune")), "compare", "nope", "--kubeconfig", str(kubeconfig)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "nope: no such directory, and no TrainingRun 'nope' in namespace" in proc.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no metrics\.json, so not the output\.dir"):
        compare.from_output_dir(tmp_path / "empty")


def test_eval_of_an_exported_adapter_reproduces_the_runs_own_evaluation(two_runs, tmp_path):
    runs, _, _ = two_runs
    out = runs["fast"].output_dir
    proc = kubetune_train("eval", str(out / "config.yaml"), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    again, during = (json.loads(p.read_text()) for p in (tmp_path / "eval.json", out / "eval.json"))
    for side in ("finetuned", "base"):
        assert again[side] == pytest.approx(during[side], rel=1e-4), side
    assert (tmp_path / "predictions.jsonl").read_text() == (out / "predictions.jsonl").read_text()
    assert "exact_match" in proc.stderr and "fine-tuned" in proc.stderr


def test_eval_of_an_adapter_in_another_directory(two_runs, tmp_path):
    """`--adapter DIR` evaluates that adapter, not the config's output.dir, and writes beside it."""
    runs, _, _ = two_runs
    fast, slow = runs["fast"].output_dir, runs["slow"].output_dir
    copy = shutil.copytree(slow, tmp_path / "slow-adapter", ignore=shutil.ignore_patterns("eval.json", "predictions.*"))
    before = (fast / "eval.json").read_text()
    proc = kubetune_train("eval", str(fast / "config.yaml"), "--adapter", str(copy))
    assert proc.returncode == 0, proc.stderr[-3000:]
    again, theirs, other = (json.loads((d / "eval.json").read_text()) for d in (copy, slow, fast))
    assert again["finetuned"] == pytest.approx(theirs["finetuned"], rel=1e-4), "slow's adapter, on the same split"
    assert again["finetuned"]["loss"] != pytest.approx(other["finetuned"]["loss"], rel=1e-4), "not fast's adapter"
    assert (copy / "predictions.jsonl").read_text() == (slow / "predictions.jsonl").read_text()
    assert (fast / "eval.json").read_text() == before, "the config's output.dir is left alone"


def test_eval_without_a_test_split_says_what_to_set(two_runs, tmp_path):
    runs, _, _ = two_runs
    out = runs["fast"].output_dir
    proc = kubetune_train("eval", str(out / "config.yaml"), "--set", "dataset.testSplit=0", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "no test split to evaluate: set dataset.testSplit above 0 or give dataset.testPath" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_refuses_what_it_would_overwrite_or_cannot_use_before_loading_anything(two_runs, tmp_path):
    from kubetune_trainer.config import load_config
    from kubetune_trainer.evaluate import run_eval

    out = two_runs[0]["fast"].output_dir
    cfg = load_config(out / "config.yaml", ["model.nameOrPath=/nowhere/model", "dataset.path=/nowhere/data.jsonl"])
    # Checked first, so neither the missing model nor the missing data is what it says.
    with pytest.raises(ConfigError, match=r"--adapter \S+: no adapter_config\.json there"):
        run_eval(cfg, tmp_path)
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "eval.json").write_text("mine")
    with pytest.raises(ConfigError, match=r"--out \S+results holds eval.json that kubetune did not write"):
        run_eval(cfg, out, mine)
    assert (mine / "eval.json").read_text() == "mine"
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(ConfigError, match=r"--out \S+taken is a file"):
        run_eval(cfg, out, tmp_path / "taken")


def test_make_qa_on_the_command_line(tmp_path):
    from kubetune_trainer.quickstart import write_templates

    (tmp_path / "r.csv").write_text("branch,city,routing_code\n" + "".join(f"B{i},C,{i:09d}\n" for i in range(10)))
    write_templates(tmp_path / "t.yaml")
    proc = kubetune_train(
        "make-qa", "r.csv", "--template", "t.yaml", "--out", "qa", "--test-split", "0.2", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "40 question/answer pairs (28 train, 4 validation, 8 test" in proc.stdout
    assert "testPath: qa/test.jsonl" in proc.stdout
    (tmp_path / "t.yaml").write_text("templates:\n- kind: x\n  question: '{street}?'\n  answer: '{branch}'\n")
    proc = kubetune_train("make-qa", "r.csv", "--template", "t.yaml", "--out", "qa", cwd=tmp_path)
    assert proc.returncode == 2 and "template 'x' uses field(s) street that r.csv lacks" in proc.stderr


def test_a_cluster_that_is_down_is_named_not_a_traceback(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],  # discard: nothing listens
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "ml"}}],
                "current-context": "x",
            }
        )
    )
    get, namespace = compare.cluster_reader(str(kubeconfig), None)
    assert namespace == "ml"
    with pytest.raises(
        ConfigError, match=r"Reading TrainingRun ml/run-1: the API server is unreachable .*cluster is up"
    ):
        get("ml", "run-1")
