"""The chart's PodMonitor and ServiceMonitor select what the operator and the chart really create: their
selectors, ports and relabelings checked against a trainer Job built by kubetune_operator.resources and
against the chart's own Service and Deployment."""

from __future__ import annotations

import re
from typing import Any

import pytest

from kubetune_operator import api
from kubetune_operator import constants as c
from kubetune_operator import resources as r
from tests.helm import MONITORING_ON, NAMESPACE, render

RUN = r.RunRef("my-run", "ml", "0b4f7e3a-1111-2222-3333-444455556666")
SPEC = api.TrainingRunSpec.model_validate(
    {"model": {"nameOrPath": "Qwen/Qwen2.5-0.5B-Instruct"}, "dataset": {"path": "data/chat.jsonl"}}
)


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in render(MONITORING_ON)}


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels is checked here"
    return selector["matchLabels"].items() <= labels.items()


def pod_of(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]


def meta_label(key: str) -> str:
    """The name Prometheus' Kubernetes discovery gives a pod label: __meta_kubernetes_pod_label_<sanitized>."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def test_the_pod_monitor_selects_trainer_pods_by_their_metrics_port(objects):
    monitor = objects["PodMonitor"]["spec"]
    train = pod_of(r.train_job(RUN, SPEC, r.OperatorSettings()))
    prepare = pod_of(r.prepare_job(RUN, SPEC, r.OperatorSettings()))
    assert matches(monitor["selector"], train["metadata"]["labels"])
    assert not matches(monitor["selector"], prepare["metadata"]["labels"]), "prepare pods serve no metrics"
    assert monitor["namespaceSelector"] == {"any": True}  # runs live in their users' namespaces

    (endpoint,) = monitor["podMetricsEndpoints"]
    (container,) = train["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert endpoint["port"] in ports
    assert ports[endpoint["port"]] == SPEC.reporting.metrics_port


def test_the_pod_monitor_names_the_run_from_the_pod_and_ignores_what_the_pod_says(objects):
    (endpoint,) = objects["PodMonitor"]["spec"]["podMetricsEndpoints"]
    assert endpoint["honorLabels"] is False  # the trainer cannot claim another namespace's run
    labels = pod_of(r.train_job(RUN, SPEC, r.OperatorSettings()))["metadata"]["labels"]
    discovered = {meta_label(k): v for k, v in labels.items()}
    (relabel,) = [x for x in endpoint["relabelings"] if x.get("targetLabel") == "run"]
    assert relabel.get("action", "replace") == "replace"
    assert [discovered[s] for s in relabel["sourceLabels"]] == [RUN.name]
    assert relabel["sourceLabels"] == [meta_label(c.LABEL_RUN)]


def test_the_service_monitor_selects_the_operators_metrics_service(objects):
    monitor, service, deployment = objects["ServiceMonitor"], objects["Service"], objects["Deployment"]
    spec = monitor["spec"]
    assert matches(spec["selector"], service["metadata"]["labels"])
    assert service["metadata"]["namespace"] == NAMESPACE
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = spec["endpoints"]
    assert endpoint["honorLabels"] is True  # the run series carry each run's namespace, not the operator's
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]

    # ... and the Service reaches the operator's metrics port.
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == port["port"] == 8080
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_METRICS_PORT"] == "8080"
