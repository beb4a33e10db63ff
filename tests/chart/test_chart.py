"""The Helm chart through Helm's own Go library (helm-python-sdk): lint, render, Kubernetes schemas."""

from __future__ import annotations

from urllib.parse import urlsplit

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.dockerfiles import entrypoint, user
from tests.helm import CHART, KUBE_VERSIONS, MONITORING_ON, NAMESPACE, notes, render, rendered

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
OPERATOR_DOCKERFILE = "Dockerfile.operator"
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
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (container,) = pod["containers"]
    assert container["resources"] == yaml.safe_load((CHART / "values.yaml").read_text())["resources"]
    assert (
        container["resources"]["requests"].keys() == {"cpu", "memory"} and "memory" in container["resources"]["limits"]
    )
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


def test_resources_come_from_the_values():
    resources = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    (deployment,) = [o for o in render({"resources": resources}) if o["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"] == resources


def test_the_probes_call_the_liveness_endpoint_the_operator_image_starts():
    """The image's ENTRYPOINT (which the Deployment's args go to: the chart sets no command) serves kopf's
    liveness endpoint; the probes must ask that very port and path, or the kubelet restarts a healthy operator."""
    (url,) = [urlsplit(a.split("=", 1)[1]) for a in entrypoint(OPERATOR_DOCKERFILE) if a.startswith("--liveness=")]
    assert url.hostname == "0.0.0.0", "reachable from the kubelet, on the pod's IP"
    (container,) = rendered("Deployment")["spec"]["template"]["spec"]["containers"]
    assert "command" not in container, "the chart starts the image's ENTRYPOINT"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == url.port
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert (ports.get(get["port"], get["port"]), get["path"]) == (url.port, url.path), probe


def test_the_pod_runs_as_the_user_its_dockerfile_names():
    """runAsNonRoot needs a numeric user; the chart's must be the image's, which owns what the image holds."""
    context = rendered("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert user(OPERATOR_DOCKERFILE) == (context["runAsUser"], context["runAsGroup"])


def test_a_metrics_port_of_its_own_reaches_the_service_the_pod_and_the_operator():
    objects = {o["kind"]: o for o in render({"metrics": {"port": 9090}})}
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9090, "health": 8081}
    assert {e["name"]: e["value"] for e in container["env"]}["KUBETUNE_METRICS_PORT"] == "9090"
    assert objects["Service"]["spec"]["ports"][0]["port"] == 9090


def test_the_health_port_is_refused_as_the_metrics_port():
    """kopf's liveness endpoint holds 8081 (the image's ENTRYPOINT); /metrics there would never bind."""
    with pytest.raises(helm_python.HelmError) as raised:
        render({"metrics": {"port": 8081}})
    assert "metrics.port: 8081 is the operator's health port" in str(raised.value)
    assert "choose another port" in str(raised.value)


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
        # A leading 0 (read as octal by sprig's `int`: "08m" was 0 seconds, a stall for every run) or zero.
        ({"prometheusRule": {"stalledAfter": "08m"}}, "stalledAfter"),
        ({"prometheusRule": {"pendingFor": "015m"}}, "pendingFor"),
        ({"prometheusRule": {"queuedFor": "0h"}}, "queuedFor"),
        ({"prometheusRule": {"reconcileErrorsFor": "0m"}}, "reconcileErrorsFor"),
        ({"metrics": {"serviceMonitor": {"interval": "0s"}}}, "interval"),
        ({"watchNamespaces": ["Team_B"]}, "watchNamespaces"),
        ({"trainr": {"image": "x"}}, "trainr"),
    ],
)
def test_bad_values_are_refused_naming_the_value(values, named):
    with pytest.raises(helm_python.HelmError) as raised:
        render(values)
    assert named in str(raised.value)


def note_lines(values: dict) -> list[str]:
    return [line.strip() for line in notes(values).splitlines()]


def test_notes_tell_the_user_what_to_run_next():
    lines = note_lines({})
    assert "It manages TrainingRuns in every namespace." in lines
    assert f"kubectl -n {NAMESPACE} rollout status deployment/kubetune-operator" in lines
    # Every namespace is watched: the example lands in the current one, and is seen there.
    assert "kubectl apply -f examples/trainingrun-cpu-tiny.yaml" in lines
    assert "kubectl get trainingruns -w" in lines
    assert "kubectl describe trainingrun tiny-cpu" in lines


def test_notes_send_the_first_run_to_a_watched_namespace():
    """The example names no namespace: applied as is, it would land where the operator does not look."""
    lines = note_lines({"watchNamespaces": ["ml", "team-b"]})
    assert "It manages TrainingRuns in: ml, team-b (runs in other namespaces get no status)." in lines
    assert "kubectl apply -n ml -f examples/trainingrun-cpu-tiny.yaml" in lines
    assert "kubectl get trainingruns -n ml -w" in lines
    assert "kubectl describe trainingrun -n ml tiny-cpu" in lines
    commands = [line for line in lines if line.startswith("kubectl ") and "trainingrun" in line]
    assert all(" -n " in line for line in commands), commands


def test_notes_say_where_the_pull_secrets_must_exist():
    """Trainer pods name the secrets in their run's namespace; one that exists only beside the operator is
    not found there, and a private image does not pull."""
    assert not [line for line in note_lines({}) if "pull secret" in line.lower()]
    lines = note_lines({"imagePullSecrets": [{"name": "regcred"}, {"name": "mirror"}]})
    text = " ".join(lines)
    assert "Image pull secrets: regcred, mirror." in text
    assert f"must exist in every namespace where runs are created, not only in {NAMESPACE}." in text
    text = " ".join(note_lines({"imagePullSecrets": [{"name": "regcred"}], "watchNamespaces": ["ml", "team-b"]}))
    assert f"must exist in ml, team-b, not only in {NAMESPACE}." in text
