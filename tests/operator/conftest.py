"""An API server emulator, a job runner and the operator under kopf, for integration tests."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.operator.emulator import ApiServer
from tests.operator.jobrunner import JobRunner

NAMESPACE = "ml"
TRAININGRUNS = ("kubetune.io", "trainingruns")
OPERATOR_USER, TRAINER_USER = "operator", "trainer"  # bearer tokens: the emulator records each one's calls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float = 120, what: str = "condition", every: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


class Cluster:
    """The emulator and the job runner, with the helpers tests use."""

    def __init__(self, server: ApiServer, runner: JobRunner, kubeconfig: Path) -> None:
        self.server, self.runner, self.kubeconfig = server, runner, kubeconfig

    def res(self, group: str, plural: str) -> Any:
        return self.server.resource(group, plural)

    def apply_run(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": spec,
        }
        return self.server.call(lambda: self.server.create(self.res(*TRAININGRUNS), NAMESPACE, body))

    def run(self, name: str) -> dict[str, Any] | None:
        return self.server.call(lambda: self.server.objects[TRAININGRUNS].get((NAMESPACE, name)))

    def status(self, name: str) -> dict[str, Any]:
        return (self.run(name) or {}).get("status") or {}

    def patch_run(self, name: str, spec: dict[str, Any]) -> None:
        from tests.operator.emulator import merge_patch

        self.server.call(
            lambda: self.server.update(
                self.res(*TRAININGRUNS), NAMESPACE, name, lambda o: merge_patch(o, {"spec": spec})
            )
        )

    def delete_run(self, name: str) -> None:
        self.server.call(lambda: self.server.delete(self.res(*TRAININGRUNS), NAMESPACE, name))

    def children(self, plural: str, run: str, group: str = "") -> list[dict[str, Any]]:
        return self.server.call(lambda: self.server.list(self.res(group, plural), NAMESPACE, f"kubetune.io/run={run}"))

    def pods(self, job: str) -> list[dict[str, Any]]:
        return self.server.call(lambda: self.server.list(self.res("", "pods"), NAMESPACE, f"job-name={job}"))

    def events(self, run: str) -> list[dict[str, Any]]:
        """The run's events, oldest first."""
        found = [
            e
            for e in self.server.call(lambda: self.server.list(self.res("", "events"), NAMESPACE))
            if e.get("involvedObject", {}).get("name") == run
        ]
        return sorted(found, key=lambda e: int(e["metadata"]["resourceVersion"]))

    def wait_phase(self, name: str, *phases: str, timeout: float = 180) -> dict[str, Any]:
        return self._wait_status(name, lambda s: s.get("phase") in phases, f"to reach {phases}", timeout)

    def wait_status(self, name: str, timeout: float = 180, **want: Any) -> dict[str, Any]:
        """The run's status once every given field holds its value, e.g. reason="QuotaExceeded"."""
        return self._wait_status(name, lambda s: all(s.get(k) == v for k, v in want.items()), f"{want}", timeout)

    def _wait_status(self, name: str, ok: Callable[[dict], bool], what: str, timeout: float) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.status(name)  # read once: the operator may change it between two reads
            return status if ok(status) else None

        return wait_for(
            check, timeout, f"{name} {what} (now {self.status(name).get('phase')}: {self.status(name).get('message')})"
        )

    def workspace(self, run: str) -> Path:
        return self.runner.volume(NAMESPACE, f"{run}-workspace")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    server = ApiServer().start()
    kubeconfig = server.kubeconfig(root / "kubeconfig", user=OPERATOR_USER)
    env = {
        # The trainer pods' way to the API server, as a user of their own (their service account).
        "KUBECONFIG": str(server.kubeconfig(root / "trainer-kubeconfig", user=TRAINER_USER)),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    runner = JobRunner(server, root / "nodes", env=env).start()
    # kopf matches --namespace against the cluster's Namespace objects.
    server.call(lambda: server.create(server.resource("", "namespaces"), None, {"metadata": {"name": NAMESPACE}}))
    yield Cluster(server, runner, kubeconfig)
    runner.stop()
    server.stop()


class Operator:
    """kopf running the operator in a thread of this process, stoppable and restartable."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.metrics_port = free_port()
        self._runner: Any = None

    def start(self) -> Operator:
        from kopf.testing import KopfRunner

        os.environ.update(
            {
                "KUBECONFIG": str(self.cluster.kubeconfig),
                "KUBETUNE_RESYNC_SECONDS": "1",
                "KUBETUNE_POD_CREATE_GRACE_SECONDS": "1",
                "KUBETUNE_TRAINER_IMAGE": "kubetune/trainer:test",
                "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            }
        )
        self._runner = KopfRunner(
            ["run", "--standalone", "--namespace", NAMESPACE, "-m", "kubetune_operator.handlers"], timeout=60
        )
        self._runner.__enter__()
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self._runner.__exit__(None, None, None)
            self._runner = None


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[Operator]:
    op = Operator(cluster).start()
    yield op
    op.stop()


@pytest.fixture(scope="module")
def seed(tiny_model: Path, qa_rows: list[dict[str, str]]) -> Callable[[Path], None]:
    """Put the tiny model and the QA data on a run's volume, as a user would before applying a run."""
    from tests.conftest import write_jsonl

    def put(volume: Path) -> None:
        (volume / "data").mkdir(parents=True, exist_ok=True)
        shutil.copytree(tiny_model, volume / "models" / "tiny", dirs_exist_ok=True)
        write_jsonl(volume / "data" / "qa.jsonl", qa_rows)

    return put


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    """A CPU-only TrainingRun of the tiny model: seconds of training."""
    spec: dict[str, Any] = {
        "model": {"nameOrPath": "models/tiny"},
        "dataset": {"path": "data/qa.jsonl", "maxSeqLength": 64},
        "training": {"maxSteps": 12, "batchSize": 8, "learningRate": 3e-3, "loggingSteps": 2},
        "evaluation": {"evalSteps": 6},
        "checkpoints": {"everySteps": 4},
        "resources": {"gpu": 0, "cpu": 1, "memory": "2Gi"},
        "reporting": {"metricsPort": None},  # pods share this host's ports; tests that scrape pick a free one
    }
    for key, value in overrides.items():
        node = spec
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return spec
