"""The Helm chart rendered by Helm's own Go library (helm-python-sdk), for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "helm" / "kubetune"
RELEASE, NAMESPACE = "kubetune", "kubetune-system"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with published schemas.
KUBE_VERSIONS = ("1.29.0", "1.37.0")


def _render(values: dict[str, Any] | None, chart: Path) -> dict[str, str]:
    """Each template's output by its path, as `helm install` renders it for RELEASE in NAMESPACE."""
    import helm_python

    loaded = helm_python.Chart.load(str(chart))
    return loaded.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(values: dict[str, Any] | None = None, chart: Path = CHART) -> list[dict[str, Any]]:
    """Every object `helm template` would print for these values (of a copy of the chart, with `chart`)."""
    out = _render(values, chart)
    return [doc for path, text in out.items() if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]


def rendered(kind: str, values: dict[str, Any] | None = None, chart: Path = CHART) -> dict[str, Any]:
    """The one object of this kind."""
    (found,) = [o for o in render(values, chart) if o["kind"] == kind]
    return found


def notes(values: dict[str, Any] | None = None, chart: Path = CHART) -> str:
    """NOTES.txt as `helm install` prints it after installing."""
    return _render(values, chart)[f"{chart.name}/templates/NOTES.txt"]


MONITORING_ON = {
    "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
}
