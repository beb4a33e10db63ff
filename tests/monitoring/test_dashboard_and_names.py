"""Every metric the dashboard and the alerts query is one the code exports; the dashboard loads, and its
queries (run by promtool on synthetic series) fall back to the operator's series and show one line per run."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_operator.crd import PRINTER_COLUMNS
from kubetune_operator.metrics import PROGRESS_GAUGES, OperatorMetrics
from kubetune_trainer.sinks import Progress, PrometheusSink, as_status
from tests.helm import CHART, MONITORING_ON, rendered
from tests.operator.conftest import free_port

DASHBOARD = CHART / "files" / "grafana-dashboard.json"
# PromQL words that look like metric names but are not.
NOT_METRICS = {"le", "by", "on", "or", "and", "unless", "without", "bool"}


# One progress record as the trainer makes it, every field set.
PROGRESS = Progress(
    step=5,
    total_steps=10,
    epoch=0.5,
    percent=50.0,
    eta_seconds=5.0,
    eta="5s",
    train_loss=2.0,
    eval_loss=2.1,
    learning_rate=1e-3,
    grad_norm=0.4,
    tokens_per_second=900.0,
    samples_per_second=8.0,
    tokens_seen=4500,
    samples_seen=40,
    gpu_memory_peak_bytes=1 << 30,
    non_finite_steps=0,
    last_update_time="2026-11-22T10:01:00Z",
)


def exported_names() -> set[str]:
    """Sample names the trainer's and the operator's endpoints really serve, everything set."""
    sink = PrometheusSink(free_port())
    try:
        sink.progress(PROGRESS, None)
        trainer = generate_latest(sink.registry).decode()
    finally:
        sink.close()
    body = {
        "metadata": {"namespace": "ml", "name": "r"},
        "status": {
            "phase": "Running",
            "restarts": 1,
            "startTime": "2026-11-22T10:00:00Z",
            "conditions": [{"type": "Running", "status": "True", "lastTransitionTime": "2026-11-22T10:00:00Z"}],
            "progress": as_status(PROGRESS),  # status.progress exactly as the trainer's status sink writes it
        },
    }
    metrics = OperatorMetrics(lambda: [body])
    metrics.observe("run", lambda: None)
    operator = generate_latest(metrics.registry).decode()
    return {
        sample.name
        for text in (trainer, operator)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def queried_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", expr))
    return {w for w in words if w.startswith("kubetune_")} | {w for w in words - NOT_METRICS if "_" in w}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def panel_queries() -> dict[str, str]:
    """Panel title -> its query as Grafana sends it with every namespace and run selected."""
    dash = json.loads(DASHBOARD.read_text())
    return {p["title"]: concrete(p["targets"][0]["expr"]) for p in dash["panels"] if p.get("targets")}


def concrete(expr: str) -> str:
    return expr.replace("$namespace", ".*").replace("$run", ".*").replace("$__rate_interval", "1m")


def rule_exprs() -> list[str]:
    spec = rendered("PrometheusRule", MONITORING_ON)["spec"]
    return [r["expr"] for g in spec["groups"] for r in g["rules"]]


def test_every_queried_metric_is_exported():
    exported = exported_names()
    for expr in dashboard_exprs() + rule_exprs():
        names = {n for n in queried_names(expr.replace("label_values(", "(")) if not n.startswith("__")}
        assert names, f"no metric found in {expr!r}"
        missing = names - exported
        assert not missing, f"{expr!r} queries {sorted(missing)}, which no kubetune endpoint exports"


def test_every_run_metric_is_on_the_dashboard():
    shown = {n for e in dashboard_exprs() for n in queried_names(e)}
    exported = {n for n in exported_names() if n.startswith(("kubetune_run_", "kubetune_trainer_"))}
    # Not plotted: totals (in Progress already), epochs, samples (tokens say it), and the stall clock
    # (the alert's business).
    unplotted = {
        "kubetune_trainer_total_steps",
        "kubetune_trainer_epoch",
        "kubetune_trainer_samples_total",
        "kubetune_trainer_last_progress_timestamp_seconds",
        "kubetune_run_total_steps",
        "kubetune_run_last_progress_timestamp_seconds",
    }
    assert exported - unplotted <= shown, sorted(exported - unplotted - shown)


def test_panels_with_a_unit_declare_it():
    """Grafana shows a bare number otherwise: seconds as 3600, bytes as 1073741824."""
    dash = json.loads(DASHBOARD.read_text())
    units = {p["title"]: p.get("fieldConfig", {}).get("defaults", {}).get("unit") for p in dash["panels"]}
    assert units["Tokens per second"] == "count:tokens/s"  # Grafana's custom count unit: 12.5 K tokens/s
    assert units["ETA"] == units["Time in current phase"] == units["Reconcile duration p99"] == "s"
    assert units["GPU memory (peak)"] == "bytes"
    assert units["Progress"] == "percentunit"
    assert units["Reconciles per second"] == "ops"


def test_gauges_of_now_are_instant_queries():
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        if panel["type"] == "bargauge":
            assert all(t.get("instant") is True for t in panel["targets"]), panel["title"]


def test_panels_show_one_line_per_run_and_fall_back_to_the_run_status(promtool, tmp_path: Path):
    """Run "a" has trainer series from two pods (a restart) and operator series; run "b" only operator
    series (no PodMonitor, or its trainer is gone)."""
    queries = panel_queries()
    trainer = 'namespace="ml", run="a", job="ml/trainers"'
    operator = 'job="kubetune-operator", instance="10.0.0.9:8080", pod="kubetune-abc"'
    series = {
        f'kubetune_trainer_train_loss{{{trainer}, pod="a-train-1"}}': "3.0x5",
        f'kubetune_trainer_train_loss{{{trainer}, pod="a-train-2"}}': "2.0x5",
        f'kubetune_run_train_loss{{namespace="ml", run="a", {operator}}}': "2.6x5",
        f'kubetune_run_train_loss{{namespace="ml", run="b", {operator}}}': "4.0x5",
        # 600 tokens a minute from the trainer; the run's status says 9.
        f'kubetune_trainer_tokens_total{{{trainer}, pod="a-train-2"}}': "1000+600x5",
        f'kubetune_run_tokens_per_second{{namespace="ml", run="a", {operator}}}': "9x5",
        f'kubetune_run_tokens_per_second{{namespace="ml", run="b", {operator}}}': "7x5",
        # b entered Queued at t=60s; promtool's clock is at 240s.
        f'kubetune_run_phase_transition_timestamp_seconds{{namespace="ml", run="b", {operator}}}': "60x5",
        f'kubetune_run_phase{{namespace="ml", run="b", phase="Queued", {operator}}}': "1x5",
        f'kubetune_run_phase{{namespace="ml", run="b", phase="Running", {operator}}}': "0x5",
        # The ETA of Running runs only: a's from its trainer, d's from its status (no trainer series). b
        # (Queued) and c (Suspended, its trainer still saving a checkpoint) keep their last estimate in the
        # status, and c in its pod: neither is shown.
        f'kubetune_run_phase{{namespace="ml", run="a", phase="Running", {operator}}}': "1x5",
        f'kubetune_trainer_eta_seconds{{{trainer}, pod="a-train-2"}}': "600x5",
        f'kubetune_run_eta_seconds{{namespace="ml", run="a", {operator}}}': "660x5",
        f'kubetune_run_eta_seconds{{namespace="ml", run="b", {operator}}}': "900x5",
        f'kubetune_run_phase{{namespace="ml", run="c", phase="Running", {operator}}}': "1 1 0x3",
        f'kubetune_run_phase{{namespace="ml", run="c", phase="Suspended", {operator}}}': "0 0 1x3",
        'kubetune_trainer_eta_seconds{namespace="ml", run="c", job="ml/trainers", pod="c-train-0"}': "300x5",
        f'kubetune_run_eta_seconds{{namespace="ml", run="c", {operator}}}': "300x5",
        f'kubetune_run_phase{{namespace="ml", run="d", phase="Running", {operator}}}': "1x5",
        f'kubetune_run_eta_seconds{{namespace="ml", run="d", {operator}}}': "120x5",
    }
    run_a, run_b = '{namespace="ml", run="a"}', '{namespace="ml", run="b"}'
    cases = [
        (queries["Training loss"], [(run_a, 3.0), (run_b, 4.0)]),  # the trainer's value, one line for two pods
        (queries["Tokens per second"], [(run_a, 10.0), (run_b, 7.0)]),
        (queries["Time in current phase"], [('{namespace="ml", run="b", phase="Queued"}', 180.0)]),
        (queries["ETA"], [(run_a, 600.0), ('{namespace="ml", run="d"}', 120.0)]),
    ]
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series.items()],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "4m",
                        "exp_samples": [{"labels": labels, "value": value} for labels, value in expected],
                    }
                    for expr, expected in cases
                ],
            }
        ],
    }
    path = tmp_path / "dashboard_test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_is_valid_json_with_the_datasource_as_a_variable():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    assert {"Runs by phase", "Training loss", "Tokens per second", "ETA", "GPU memory (peak)", "Restarts"} <= titles
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    # The ConfigMap carries the file byte for byte, with the Grafana sidecar's label.
    config_map = rendered("ConfigMap", MONITORING_ON)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["kubetune.json"]) == dash


def test_the_operator_reads_the_progress_fields_the_trainer_writes():
    """The gauges and the kubectl columns name status.progress fields by hand: a renamed Progress field would
    leave them empty without an error anywhere."""
    written = as_status(PROGRESS)
    read = {field for _, field in PROGRESS_GAUGES.values()}
    read |= {
        col["jsonPath"].removeprefix(".status.progress.") for col in PRINTER_COLUMNS if ".progress." in col["jsonPath"]
    }
    assert read and read <= set(written), sorted(read - set(written))
