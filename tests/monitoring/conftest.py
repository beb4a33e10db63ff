"""Prometheus and promtool from Debian's `prometheus` package; skipped with the reason when absent,
except in CI (KUBETUNE_REQUIRE_PROMETHEUS=1), where a missing binary is a failure."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helm import MONITORING_ON, rendered


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install prometheus)"
        if os.environ.get("KUBETUNE_REQUIRE_PROMETHEUS"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _binary("promtool")


@pytest.fixture(scope="session")
def prometheus() -> str:
    return _binary("prometheus")


@pytest.fixture(scope="session")
def rule_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart's PrometheusRule with default values, as a Prometheus rule file."""
    spec = rendered("PrometheusRule", MONITORING_ON)["spec"]
    path = tmp_path_factory.mktemp("rules") / "kubetune-rules.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# The operator integration fixtures: the API server emulator, the job runner and the operator under kopf.
from tests.operator.conftest import cluster, operator, seed  # noqa: E402, F401
