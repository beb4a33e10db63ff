"""The README's cluster quickstart against a real cluster (kind, or any you point it at).

Runs when KUBETUNE_E2E_KUBECONFIG names a kubeconfig; skipped with the reason otherwise. The
images must be reachable from the cluster's nodes (for kind: `kind load docker-image`); name
them with KUBETUNE_E2E_OPERATOR_IMAGE and KUBETUNE_E2E_TRAINER_IMAGE (default: the README's
local tags). The chart is rendered by Helm's Go library and applied with kubectl, into a
namespace of its own that the test deletes at the end.

    KUBETUNE_E2E_KUBECONFIG=$(kind get kubeconfig-path) pytest tests/e2e -v
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm import CHART

ROOT = Path(__file__).resolve().parents[2]
KUBECONFIG = os.environ.get("KUBETUNE_E2E_KUBECONFIG")
OPERATOR_IMAGE = os.environ.get("KUBETUNE_E2E_OPERATOR_IMAGE", "kubetune/operator:dev")
TRAINER_IMAGE = os.environ.get("KUBETUNE_E2E_TRAINER_IMAGE", "kubetune/trainer:dev")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not KUBECONFIG, reason="no cluster: set KUBETUNE_E2E_KUBECONFIG to run the e2e journey"),
]


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> str:
    result = subprocess.run(
        ["kubectl", "--kubeconfig", KUBECONFIG or "", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,  # relative paths as in the README and the chart's NOTES: from a checkout of kubetune
    )
    if check and result.returncode:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
    return result.stdout


# The chart's NOTES per installed namespace: the test runs the commands they tell the user to run.
NOTES: dict[str, str] = {}


def notes_command(namespace: str, start: str) -> list[str]:
    (line,) = [x.strip() for x in NOTES[namespace].splitlines() if x.strip().startswith(start)]
    return line.split()[1:]


@pytest.fixture(scope="module")
def installed() -> Iterator[str]:
    import helm_python

    namespace = f"kubetune-e2e-{uuid.uuid4().hex[:6]}"
    repository, _, tag = OPERATOR_IMAGE.rpartition(":")
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
        "trainer": {"image": TRAINER_IMAGE, "pullPolicy": "IfNotPresent"},
        "watchNamespaces": [namespace],
    }
    rendered = helm_python.Chart.load(str(CHART)).render(values, name="kubetune", namespace=namespace, is_install=True)
    manifests = "\n---\n".join(text for path, text in rendered.items() if path.endswith(".yaml"))
    kubectl("create", "namespace", namespace)
    kubectl("apply", "--server-side", "-f", str(CHART / "crds" / "trainingrun.yaml"))
    kubectl("apply", "-n", namespace, "-f", "-", stdin=manifests)
    kubectl("-n", namespace, "rollout", "status", "deployment/kubetune-operator", "--timeout=180s")
    NOTES[namespace] = rendered["kubetune/templates/NOTES.txt"]
    yield namespace
    kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    kubectl("delete", "clusterrole,clusterrolebinding", "-l", "app.kubernetes.io/instance=kubetune", check=False)


def run_status(namespace: str, name: str) -> dict[str, Any]:
    return json.loads(kubectl("-n", namespace, "get", "trainingrun", name, "-o", "json")).get("status") or {}


def test_the_cpu_example_trains_to_succeeded_with_live_progress(installed):
    namespace = installed
    manifest = yaml.safe_load((ROOT / "examples" / "trainingrun-cpu-tiny.yaml").read_text())
    # As the NOTES say, word for word: into the watched namespace, or the run would never get a status.
    apply = notes_command(namespace, "kubectl apply")
    assert apply == ["apply", "-n", namespace, "-f", "examples/trainingrun-cpu-tiny.yaml"]
    kubectl(*apply)
    name = manifest["metadata"]["name"]
    seen_progress = None
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        status = run_status(namespace, name)
        if status.get("progress", {}).get("step"):
            seen_progress = status["progress"]
            table = kubectl(*notes_command(namespace, "kubectl get trainingruns")[:-1], name)  # without -w
            assert "PROGRESS" in table and "ETA" in table
        if status.get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(5)
    assert status.get("phase") == "Succeeded", status
    assert seen_progress is not None, "the trainer's progress reached the status while it ran"
    assert status["output"] == {"volume": f"{name}-workspace", "path": "/workspace/output"}
    assert status["evaluation"]["evalLoss"] > 0
    events = kubectl("-n", namespace, "get", "events", "--field-selector", f"involvedObject.name={name}")
    assert "Completed" in events


def test_a_bad_run_is_refused_by_the_api_server_naming_the_field(installed):
    manifest = yaml.safe_load((ROOT / "examples" / "trainingrun-cpu-tiny.yaml").read_text())
    manifest["metadata"]["name"] = "bad-rank"
    manifest["spec"]["lora"]["r"] = 0
    result = subprocess.run(
        ["kubectl", "--kubeconfig", KUBECONFIG or "", "apply", "-n", installed, "-f", "-"],
        input=yaml.safe_dump(manifest),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "spec.lora.r" in result.stderr
