"""The Helm chart rendered by Helm's own Go library (helm-python-sdk), for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "helm" / "kubetune"
RELEASE, NAMESPACE = "kubetune", "kubetune-system"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with published schemas.
KUBE_VERSIONS = ("1.29.0", "1.37.0")


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object `helm template` would print for these values."""
    import helm_python

    chart = helm_python.Chart.load(str(CHART))
    out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [doc for path, text in out.items() if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]


def rendered(kind: str, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one object of this kind."""
    (found,) = [o for o in render(values) if o["kind"] == kind]
    return found


MONITORING_ON = {
    "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
}
