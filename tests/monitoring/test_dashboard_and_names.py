"""Every metric the dashboard and the alerts query is one the code exports; the dashboard loads."""

from __future__ import annotations

import json
import re

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_operator.metrics import OperatorMetrics
from kubetune_trainer.report import Progress
from kubetune_trainer.sinks import PrometheusSink
from tests.helm import CHART, MONITORING_ON, rendered
from tests.operator.conftest import free_port

DASHBOARD = CHART / "files" / "grafana-dashboard.json"
# PromQL words that look like metric names but are not.
NOT_METRICS = {"le", "by", "on", "or", "and", "unless", "without", "bool"}


def exported_names() -> set[str]:
    """Sample names the trainer's and the operator's endpoints really serve, everything set."""
    sink = PrometheusSink(free_port(), {"run": "r", "namespace": "ml"})
    try:
        sink.progress(Progress(5, 10, 0.5, 50.0, 5.0, "5s", 2.0, 2.1, 1e-3, 0.4, 900.0, 8.0, 1 << 30, "x"), None)
        trainer = generate_latest(sink.registry).decode()
    finally:
        sink.close()
    body = {
        "metadata": {"namespace": "ml", "name": "r"},
        "status": {
            "phase": "Running",
            "restarts": 1,
            "startTime": "2026-11-22T10:00:00Z",
            "progress": {
                "step": 5,
                "totalSteps": 10,
                "trainLoss": 2.0,
                "evalLoss": 2.1,
                "tokensPerSecond": 900.0,
                "etaSeconds": 5.0,
                "lastUpdateTime": "2026-11-22T10:01:00Z",
            },
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
    # Shown elsewhere: the trainer's step/ETA/progress duplicate the run's, which the dashboard uses.
    duplicates = {
        "kubetune_trainer_step",
        "kubetune_trainer_total_steps",
        "kubetune_trainer_epoch",
        "kubetune_trainer_progress_ratio",
        "kubetune_trainer_eta_seconds",
        "kubetune_trainer_samples_per_second",
        "kubetune_trainer_last_progress_timestamp_seconds",
        "kubetune_run_total_steps",
        "kubetune_run_train_loss",
        "kubetune_run_eval_loss",
        "kubetune_run_tokens_per_second",
        "kubetune_run_last_progress_timestamp_seconds",
    }
    assert exported - duplicates <= shown, sorted(exported - duplicates - shown)


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
