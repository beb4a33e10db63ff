"""A real Prometheus scrapes the operator and a trainer pod during an integration run; `kubectl get tr`
shows the run's live columns."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm import MONITORING_ON, rendered
from tests.monitoring.test_dashboard_and_names import concrete, dashboard_exprs, panel_queries
from tests.operator.conftest import NAMESPACE, free_port, tiny_spec, wait_for

pytestmark = pytest.mark.slow


def trainer_scrape_config(port: int, run: str) -> dict[str, Any]:
    """What the Prometheus Operator makes of the chart's PodMonitor for one trainer pod: the discovery labels
    Kubernetes would give the pod, the operator's own relabelings (namespace, pod), then the chart's."""
    (endpoint,) = rendered("PodMonitor", MONITORING_ON)["spec"]["podMetricsEndpoints"]
    chart_relabelings = [
        {
            "source_labels": r["sourceLabels"],
            "target_label": r["targetLabel"],
            "action": r.get("action", "replace"),
        }
        for r in endpoint.get("relabelings", [])
    ]
    discovered = {
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_pod_name": f"{run}-train-0",
        "__meta_kubernetes_pod_label_kubetune_io_run": run,
    }
    return {
        "job_name": "trainer",
        "honor_labels": endpoint["honorLabels"],
        "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": discovered}],
        "relabel_configs": [
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            *chart_relabelings,
        ],
    }


class Prometheus:
    def __init__(self, binary: str, root: Path, operator_port: int, trainer: dict[str, Any]) -> None:
        self.port = free_port()
        (endpoint,) = rendered("ServiceMonitor", MONITORING_ON)["spec"]["endpoints"]
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "kubetune-operator",
                    "honor_labels": endpoint["honorLabels"],
                    "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}],
                },
                trainer,
            ],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (root / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={root / 'prometheus.yml'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--storage.tsdb.path={root / 'data'}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ready, 60, "Prometheus to be ready")

    def _ready(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture
def trainer_port() -> int:
    return free_port()


@pytest.fixture
def prom(prometheus: str, operator: Any, trainer_port: int, tmp_path: Path) -> Iterator[Prometheus]:
    server = Prometheus(prometheus, tmp_path, operator.metrics_port, trainer_scrape_config(trainer_port, "watched"))
    yield server
    server.stop()


def kubectl_get(cluster: Any) -> dict[str, str]:
    user = cluster.server.kubeconfig(cluster.kubeconfig.with_name("user-kubeconfig"), user="user")
    out = subprocess.run(
        ["kubectl", "--kubeconfig", str(user), "get", "tr", "-n", NAMESPACE, "watched"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    header, row = out.splitlines()
    return dict(zip(header.split(), row.split(), strict=True))


def test_prometheus_sees_step_and_loss_advance_and_kubectl_shows_them(cluster, operator, seed, prom, trainer_port):
    seed(cluster.workspace("watched"))
    spec = tiny_spec(
        **{
            "training.maxSteps": 100000,  # longer than the test: it deletes the run when done
            "training.loggingSteps": 5,
            "evaluation.evalSteps": 200,
            "checkpoints.everySteps": 100000,
            "reporting.metricsPort": trainer_port,
            "reporting.statusIntervalSeconds": 1,
        }
    )
    cluster.apply_run("watched", spec)
    sel = f'{{namespace="{NAMESPACE}", run="watched"}}'

    # From the trainer pod, at step resolution, labelled by the PodMonitor's relabeling (the pod claims nothing).
    first = wait_for(lambda: prom.value(f"kubetune_trainer_step{sel}"), 180, "the trainer's step in Prometheus")
    wait_for(lambda: (prom.value(f"kubetune_trainer_step{sel}") or 0) > first, 60, "the step to advance")
    loss = wait_for(lambda: prom.value(f"kubetune_trainer_train_loss{sel}"), 30, "a training loss")
    assert math.isfinite(loss) and loss > 0
    wait_for(
        lambda: (v := prom.value(f"kubetune_trainer_train_loss{sel}")) is not None and v != loss,
        60,
        "the training loss to change",
    )
    assert prom.value(f"kubetune_trainer_eval_loss{sel}") > 0  # the evaluation before the first step
    wait_for(lambda: prom.value(f"rate(kubetune_trainer_tokens_total{sel}[30s])"), 30, "tokens trained per second")
    assert prom.value(f"kubetune_trainer_total_steps{sel}") == 100000
    assert prom.value(f"kubetune_trainer_non_finite_steps_total{sel}") == 0
    (series,) = prom.query(f"kubetune_trainer_step{sel}")
    assert series["metric"]["pod"] == "watched-train-0" and "exported_namespace" not in series["metric"]

    # From the operator, out of the status the trainer patches.
    assert wait_for(lambda: prom.value('kubetune_run_phase{run="watched", phase="Running"}') == 1, 30, "Running")
    run_step = wait_for(lambda: prom.value(f"kubetune_run_step{sel}"), 30, "the run's step from its status")
    wait_for(lambda: (prom.value(f"kubetune_run_step{sel}") or 0) > run_step, 30, "the run's step to advance")
    assert 0 < prom.value(f"kubetune_run_progress_ratio{sel}") < 0.1
    assert prom.value(f"kubetune_run_eta_seconds{sel}") > 0
    assert prom.value(f"kubetune_run_eval_loss{sel}") > 0
    assert abs(prom.value(f"kubetune_run_last_progress_timestamp_seconds{sel}") - time.time()) < 30
    assert 0 <= time.time() - prom.value(f"kubetune_run_phase_transition_timestamp_seconds{sel}") < 300
    assert prom.value('sum(kubetune_operator_reconciles_total{result="ok"})') > 0

    # Every dashboard query runs on a real Prometheus, and every panel but GPU memory (a CPU run) shows data.
    for expr in dashboard_exprs():
        if expr.startswith("label_values("):
            metric = re.match(r"label_values\((.*), \w+\)$", concrete(expr)).group(1)
            assert prom.query(metric), expr
    empty = {title for title, expr in panel_queries().items() if not prom.query(expr)}
    assert empty == {"GPU memory (peak)"}, empty

    # kubectl get tr: live Progress, Step, Loss, Eval and ETA from the status the trainer writes.
    row = kubectl_get(cluster)
    assert row["PHASE"] == "Running"
    assert 0 < float(row["PROGRESS"]) < 10 and int(row["STEP"]) > 0 and float(row["LOSS"]) > 0
    assert float(row["EVAL"]) > 0
    assert re.fullmatch(r"\d+[smhd][\dsmh]*", row["ETA"]), row
    wait_for(lambda: int(kubectl_get(cluster)["STEP"]) > int(row["STEP"]), 30, "kubectl's STEP to advance")

    # A deleted run's series vanish from the operator's /metrics.
    cluster.delete_run("watched")
    scrape = f"http://127.0.0.1:{operator.metrics_port}/metrics"
    wait_for(lambda: 'run="watched"' not in urllib.request.urlopen(scrape).read().decode(), 30, "the series to go")
    wait_for(lambda: cluster.pods("watched-train") == [], 60, "the trainer pod to stop")
