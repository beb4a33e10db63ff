"""The Helm chart through Helm's own Go library (helm-python-sdk): lint, render, Kubernetes schemas."""

from __future__ import annotations

import json

import helm_python
import kubernetes_validate
import pytest

from tests.helm import CHART, KUBE_VERSIONS, MONITORING_ON, NAMESPACE, render

ALL_ON = {
    **MONITORING_ON,
    "watchNamespaces": ["ml", "team-b"],
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccount": {"create": True, "name": "tuner", "annotations": {"iam.example.com/role": "tuner"}},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
    "priorityClassName": "system-cluster-critical",
    "podAnnotations": {"a": "b"},
}
# Prometheus Operator kinds: not in the Kubernetes schemas, checked by shape below.
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


@pytest.mark.parametrize("values", [{}, ALL_ON], ids=["defaults", "everything-on"])
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_helm_lint_is_clean(values, kube_version):
    result = helm_python.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version=kube_version)
    assert not result["errors"], result
    problems = [m for m in result["messages"] if m["severity"] > 1]  # 1 is INFO
    assert not problems, problems


@pytest.mark.parametrize("values", [{}, ALL_ON], ids=["defaults", "everything-on"])
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_rendered_object_validates(values, kube_version):
    objects = render(values)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "ServiceAccount", "Service"} <= kinds
    for obj in objects:
        if obj["kind"] in MONITORING_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["spec"]
            continue
        kubernetes_validate.validate(obj, kube_version, strict=True)
    if values:
        assert kinds >= MONITORING_KINDS


def test_the_operator_deployment_is_safe_to_run():
    (deployment,) = [o for o in render() if o["kind"] == "Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["port"] == "health"
    assert {p["name"] for p in container["ports"]} == {"metrics", "health"}
    assert container["args"] == ["--all-namespaces"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"].startswith("ghcr.io/kubetune/trainer:")
    assert env["KUBETUNE_METRICS_PORT"] == "8080"
    assert container["image"].endswith(":0.1.0"), "the chart's appVersion by default"


def test_the_image_the_operator_runs_is_the_one_its_dockerfile_starts():
    """The Deployment's args go to the image's ENTRYPOINT: kopf with the liveness endpoint the probes ask for."""
    dockerfile = (CHART.parents[1] / "Dockerfile.operator").read_text()
    entrypoint = json.loads(next(line for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT"))[10:])
    assert entrypoint[:3] == ["kopf", "run", "--standalone"]
    assert "--liveness=http://0.0.0.0:8081/healthz" in entrypoint


def test_namespaced_mode_has_no_cluster_wide_rights():
    objects = render({"watchNamespaces": ["ml", "team-b"]})
    kinds = [o["kind"] for o in objects]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    assert sorted(o["metadata"]["namespace"] for o in objects if o["kind"] == "Role") == ["ml", "team-b"]
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"] == ["--namespace=ml", "--namespace=team-b"]


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"replicas": 2}, "replicas"),
        ({"metrics": {"port": "eighty"}}, "/metrics/port"),
        ({"prometheusRule": {"stalledAfter": "15 minutes"}}, "stalledAfter"),
        ({"watchNamespaces": ["Team_B"]}, "watchNamespaces"),
        ({"trainr": {"image": "x"}}, "trainr"),
    ],
)
def test_bad_values_are_refused_naming_the_value(values, named):
    with pytest.raises(helm_python.HelmError) as raised:
        render(values)
    assert named in str(raised.value)


def test_notes_tell_the_user_what_to_run_next():
    chart = helm_python.Chart.load(str(CHART))
    notes = chart.render({}, name="kubetune", namespace=NAMESPACE, is_install=True)["kubetune/templates/NOTES.txt"]
    assert "rollout status deployment/kubetune-operator" in notes
    assert "kubectl get trainingruns -w" in notes
    assert "examples/trainingrun-cpu-tiny.yaml" in notes
