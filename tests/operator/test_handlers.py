"""One reconcile pass at a time, against the API server emulator over HTTP (no job runner, no kopf loop):
the test puts the run's Jobs and pods in the state it needs, runs a pass, and reads what the operator did
from the server's request log. Fast, so each behaviour of act() gets its own test."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import kopf
import kubernetes
import pytest
from kubernetes.client import ApiException
from kubernetes.client.exceptions import ApiTypeError

from kubetune_operator import constants as c
from kubetune_operator import handlers
from kubetune_operator.handlers import RunMemory, reconcile
from kubetune_operator.kube import ChildBlocked, CreateRefused, Kube, is_transient
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.resources import OperatorSettings
from tests.operator import jobrunner
from tests.operator.emulator import ApiServer, merge_patch, now_iso

NS = "ml"
RUNS, JOBS, PODS = ("kubetune.io", "trainingruns"), ("batch", "jobs"), ("", "pods")
USER = "operator"
SETTINGS = OperatorSettings(trainer_image="kubetune/trainer:test")
SPEC = {"model": {"nameOrPath": "m"}, "dataset": {"path": "d.jsonl"}, "resources": {"gpu": 0}}
_names = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[ApiServer]:
    api = ApiServer().start()
    api.call(lambda: api.create(api.resource("", "namespaces"), None, {"metadata": {"name": NS}}))
    yield api
    api.stop()


@pytest.fixture(scope="module")
def kube(server: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> Kube:
    path = server.kubeconfig(Path(tmp_path_factory.mktemp("kube")) / "kubeconfig", user=USER)
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(path), client_configuration=config)
    return Kube(kubernetes.client.ApiClient(config))


class Run:
    """One TrainingRun in the emulator, and what the operator remembers of it."""

    def __init__(self, server: ApiServer, kube: Kube, name: str | None = None, **spec: Any) -> None:
        self.server, self.kube = server, kube
        self.name = name or f"r{next(_names)}"
        self.memory = RunMemory()
        self.events: list[dict[str, Any]] = []
        body = {"metadata": {"name": self.name, "namespace": NS}, "spec": {**SPEC, **spec}}
        server.call(lambda: server.create(server.resource(*RUNS), NS, body))

    def body(self) -> dict[str, Any]:
        return copy.deepcopy(self.server.call(lambda: self.server.get(self.server.resource(*RUNS), NS, self.name)))

    @property
    def status(self) -> dict[str, Any]:
        return self.body().get("status") or {}

    def reconcile(self, body: dict[str, Any] | None = None, settings: OperatorSettings = SETTINGS) -> handlers.Derived:
        return reconcile(
            self.kube, settings, body or self.body(), self.memory, lambda _, **event: self.events.append(event)
        )

    def patch_spec(self, **spec: Any) -> None:
        res = self.server.resource(*RUNS)
        self.server.call(lambda: self.server.update(res, NS, self.name, lambda o: merge_patch(o, {"spec": spec})))

    def job(self, component: str) -> dict[str, Any] | None:
        return self.server.call(lambda: self.server.objects[JOBS].get((NS, f"{self.name}-{component}")))

    def finish(self, component: str, kind: str = "Complete", reason: str = "", pods: int = 1) -> None:
        """The Job controller's end of a Job: its pods ended (succeeded, or failed with exit 1), a condition."""
        job = self.job(component)
        assert job is not None
        for _ in range(pods):
            self.pod(component, "Succeeded" if kind == "Complete" else "Failed", 0 if kind == "Complete" else 1)
        condition = {"type": kind, "status": "True", "reason": reason, "lastTransitionTime": now_iso()}
        status = {"conditions": [condition], "startTime": now_iso()}
        if kind == "Complete":
            status.update(succeeded=1, completionTime=now_iso())
        else:
            status["failed"] = pods
        self.server.call(
            lambda: self.server.update(
                self.server.resource(*JOBS), NS, job["metadata"]["name"], lambda o: {**o, "status": status}, "status"
            )
        )

    def pod(self, component: str, phase: str = "Running", exit_code: int | None = None, owner: str | None = None):
        """A pod of the component's Job (or of another owner with the same job-name label)."""
        job = self.job(component)
        uid = owner or job["metadata"]["uid"]
        name = f"{self.name}-{component}"
        body = {
            "metadata": {
                "name": f"{name}-{next(_names)}",
                "labels": {c.LABEL_RUN: self.name, "job-name": name},
                "ownerReferences": [
                    {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid, "controller": True}
                ],
            },
            "spec": {"containers": [{"name": c.CONTAINER, "image": "x"}]},
        }
        state = {"running": {}} if exit_code is None else {"terminated": {"exitCode": exit_code, "reason": "Error"}}
        container = {"name": c.CONTAINER, "state": state, "image": "x", "imageID": "", "ready": False}
        status = {"phase": phase, "containerStatuses": [{**container, "restartCount": 0}]}
        res = self.server.resource(*PODS)

        def make() -> None:
            made = self.server.create(res, NS, body)
            self.server.update(res, NS, made["metadata"]["name"], lambda o: {**o, "status": status}, "status")

        self.server.call(make)

    def pods(self) -> list[dict[str, Any]]:
        """Every pod with the run's label, of any Job."""
        return self.server.call(lambda: self.server.list(self.server.resource(*PODS), NS, f"{c.LABEL_RUN}={self.name}"))

    def stop_pods(self, exit_code: int = c.EXIT_SIGTERM) -> None:
        """The kubelet's end of a graceful delete: the trainer exits (after its checkpoint), the pod goes."""
        res = self.server.resource(*PODS)
        ended = {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": c.CONTAINER,
                    "image": "x",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}},
                }
            ],
        }
        for pod in self.pods():
            name = pod["metadata"]["name"]
            if pod["metadata"].get("deletionTimestamp"):

                def end(name: str = name) -> None:
                    self.server.update(res, NS, name, lambda o: {**o, "status": ended}, "status")
                    self.server.remove(res, NS, name)

                self.server.call(end)

    def made(self, method: str, pattern: str, status: int | None = None) -> list[Any]:
        """The operator's requests about this run (by the path, or the name of what it created)."""

        def mine(request: Any) -> bool:
            named = ((request.body or {}).get("metadata") or {}).get("name", "")
            return f"/{self.name}" in request.path or named.startswith(f"{self.name}-")

        return [r for r in self.server.made(USER, method, pattern, status) if mine(r)]


def test_a_prepared_run_never_prepares_again_when_its_prepare_job_is_gone(server, kube):
    run = Run(server, kube)
    run.reconcile()
    run.finish(c.PREPARE)
    run.reconcile()
    assert run.job(c.TRAIN) is not None
    run.pod(c.TRAIN)
    run.reconcile()
    server.call(lambda: server.delete(server.resource(*JOBS), NS, f"{run.name}-prepare"))  # a TTL, a user
    derived = run.reconcile()
    assert derived.phase == c.RUNNING
    creates = run.made("POST", r"/jobs$", 201)
    assert [r.body["metadata"]["name"] for r in creates].count(f"{run.name}-prepare") == 1
    assert len(run.made("POST", r"/configmaps$")) == 1, "no base child made again"


def test_no_job_gets_a_ttl_before_the_run_ends_and_every_job_gets_it_after(server, kube):
    run = Run(server, kube, ttlSecondsAfterFinished=30)
    run.reconcile()
    run.finish(c.PREPARE)
    run.reconcile()
    assert "ttlSecondsAfterFinished" not in run.job(c.PREPARE)["spec"], "a prepare Job gone mid-run is no harm now"
    run.finish(c.TRAIN)
    assert run.reconcile().phase == c.SUCCEEDED
    assert run.job(c.PREPARE)["spec"]["ttlSecondsAfterFinished"] == 30
    assert run.job(c.TRAIN)["spec"]["ttlSecondsAfterFinished"] == 30
    patches = run.made("PATCH", rf"/trainingruns/{run.name}/status$")
    ttl = run.made("PATCH", rf"/jobs/{run.name}-(prepare|train)$")
    assert run.server.log.index(patches[-1]) < run.server.log.index(ttl[0]), "the end is written first"


def test_a_succeeded_run_stays_succeeded_when_its_jobs_go_and_its_spec_changes(server, kube):
    run = Run(server, kube)
    run.reconcile()
    run.finish(c.PREPARE)
    run.reconcile()
    run.finish(c.TRAIN)
    done = run.reconcile()
    assert done.phase == c.SUCCEEDED
    for component in (c.PREPARE, c.TRAIN):
        server.call(lambda component=component: server.delete(server.resource(*JOBS), NS, f"{run.name}-{component}"))
    run.patch_spec(maxRestarts=7, suspend=True)
    again = run.reconcile()
    assert (again.phase, again.reason, again.message) == (done.phase, done.reason, done.message)
    assert run.status["observedGeneration"] == 2
    assert run.job(c.PREPARE) is None and run.job(c.TRAIN) is None, "nothing made again"
    assert [e["reason"] for e in run.events].count("Completed") == 1


def test_a_failed_runs_job_is_left_alone_when_the_spec_toggles_suspend(server, kube):
    run = Run(server, kube)
    run.reconcile()
    run.finish(c.PREPARE)
    run.reconcile()
    run.finish(c.TRAIN, "Failed", "BackoffLimitExceeded", pods=4)
    assert run.reconcile().phase == c.FAILED
    before = len(run.made("PATCH", r"/jobs/"))
    run.patch_spec(suspend=True)
    run.reconcile()
    run.patch_spec(suspend=False)
    assert run.reconcile().phase == c.FAILED
    assert len(run.made("PATCH", r"/jobs/")) == before, "no suspend or unsuspend of a failed run's Job"


def test_the_mutable_fields_reach_the_running_job(server, kube):
    run = Run(server, kube)
    run.reconcile()
    run.finish(c.PREPARE)
    run.reconcile()
    run.pod(c.TRAIN)
    run.patch_spec(maxRestarts=7, activeDeadlineSeconds=3600)
    run.reconcile()
    job = run.job(c.TRAIN)["spec"]
    assert (job["backoffLimit"], job["activeDeadlineSeconds"]) == (7, 3600)
    run.patch_spec(activeDeadlineSeconds=None)
    run.reconcile()
    assert "activeDeadlineSeconds" not in run.job(c.TRAIN)["spec"]


def test_raising_max_restarts_on_a_run_that_failed_on_it_replaces_the_training_job(server, kube):
    run = Run(server, kube, maxRestarts=1)
    run.reconcile()
    run.finish(c.PREPARE)
    run.reconcile()
    old = run.job(c.TRAIN)["metadata"]["uid"]
    run.finish(c.TRAIN, "Failed", "BackoffLimitExceeded", pods=2)
    failed = run.reconcile()
    assert (failed.reason, run.status["restarts"]) == (c.REASON_BACKOFF, 1), "the final failure is no restart"
    assert "raise spec.maxRestarts" in failed.message
    run.patch_spec(maxRestarts=3)
    retrying = run.reconcile()
    assert (retrying.phase, retrying.reason) == (c.QUEUED, c.REASON_RETRYING)
    assert run.job(c.TRAIN) is None, "the failed Job is deleted"
    assert "completionTime" not in run.status
    run.reconcile()
    new = run.job(c.TRAIN)
    assert new["metadata"]["uid"] != old and new["spec"]["backoffLimit"] == 3
    run.pod(c.TRAIN)
    assert run.reconcile().phase == c.RUNNING
    assert run.status["restarts"] == 2, "the new Job replaced the final failure"
    assert [e["reason"] for e in run.events][-3:] == [c.REASON_RETRYING, "Starting", "Training"]


def failed_on_its_limit(server: ApiServer, kube: Kube) -> Run:
    """A run whose training Job failed with BackoffLimitExceeded, maxRestarts since raised from 1 to 3."""
    run = Run(server, kube, maxRestarts=1)
    run.reconcile()
    run.finish(c.PREPARE)
    run.reconcile()
    run.finish(c.TRAIN, "Failed", "BackoffLimitExceeded", pods=2)
    assert run.reconcile().phase == c.FAILED
    run.patch_spec(maxRestarts=3)
    return run


def test_a_retry_is_not_lost_when_its_status_write_fails(server, kube):
    """The failed Job once went first: were the Retrying status then lost (a 5xx, an operator restart), the
    run stayed Failed for good, with no failed Job left to retry from."""
    run = failed_on_its_limit(server, kube)
    server.call(lambda: server.fail("PATCH", rf"/trainingruns/{run.name}/status$", status=503, times=1))
    with pytest.raises(ApiException):
        run.reconcile()
    assert run.status["phase"] == c.FAILED and run.job(c.TRAIN) is not None, "nothing done: kopf retries"
    assert run.reconcile().summary == (c.QUEUED, c.REASON_RETRYING)
    assert run.job(c.TRAIN) is None
    run.reconcile()
    assert run.job(c.TRAIN)["spec"]["backoffLimit"] == 3, "the replacement"


def test_a_retry_whose_job_deletion_is_lost_deletes_it_after_an_operator_restart(server, kube):
    run = failed_on_its_limit(server, kube)
    server.call(lambda: server.fail("DELETE", rf"/jobs/{run.name}-train$", status=500, times=1))
    with pytest.raises(ApiException):
        run.reconcile()
    assert (run.status["phase"], run.status["reason"]) == (c.QUEUED, c.REASON_RETRYING), "said first"
    assert run.job(c.TRAIN)["status"]["conditions"][0]["type"] == "Failed", "the failed Job is still there"
    run.memory = RunMemory()  # the operator restarts: what it knows comes from the run's status
    assert run.reconcile().summary == (c.QUEUED, c.REASON_RETRYING)
    assert run.job(c.TRAIN) is None
    run.reconcile()
    assert run.job(c.TRAIN)["spec"]["backoffLimit"] == 3
    reasons = [e["reason"] for e in run.events]
    assert reasons[reasons.index(c.REASON_BACKOFF) :] == [c.REASON_BACKOFF, c.REASON_RETRYING, "Starting"], (
        "no Failed between"
    )


def test_a_run_created_suspended_makes_nothing_until_it_is_resumed(server, kube):
    run = Run(server, kube, suspend=True)
    for _ in range(2):
        derived = run.reconcile()
        assert derived.summary == (c.SUSPENDED, c.REASON_SUSPENDED)
        assert "nothing is created" in derived.message
    assert run.made("POST", r"") == [], "no Job, no volume, nothing"
    run.patch_spec(suspend=False)
    assert run.reconcile().summary == (c.INITIALIZING, c.REASON_PREPARING)
    assert run.job(c.PREPARE)["spec"].get("suspend") is not True


def test_suspending_while_preparing_suspends_the_prepare_job_and_resuming_goes_on(server, kube):
    run = Run(server, kube)
    run.reconcile()
    run.pod(c.PREPARE)
    run.patch_spec(suspend=True)
    assert run.reconcile().summary == (c.SUSPENDED, c.REASON_SUSPENDING)
    assert run.job(c.PREPARE)["spec"]["suspend"] is True
    # The Job controller's part: a suspended Job's pods are deleted; the kubelet stops them.
    for pod in run.pods():
        server.call(lambda pod=pod: server.delete(server.resource(*PODS), NS, pod["metadata"]["name"], graceful=True))
    run.stop_pods(exit_code=1)
    assert run.reconcile().summary == (c.SUSPENDED, c.REASON_SUSPENDED)
    assert run.job(c.TRAIN) is None
    run.patch_spec(suspend=False)
    assert run.reconcile().summary == (c.INITIALIZING, c.REASON_PREPARING)
    assert run.job(c.PREPARE)["spec"]["suspend"] is False
    run.finish(c.PREPARE)
    run.reconcile()
    assert run.job(c.TRAIN) is not None
    assert [e["reason"] for e in run.events][:4] == ["Preparing", c.REASON_SUSPENDING, c.REASON_SUSPENDED, "Preparing"]


def failed_create(server: ApiServer, job: dict[str, Any], message: str, count: int = 1) -> None:
    """What the Job controller posts when the API server refuses the Job's pod, `count` times."""
    for _ in range(count):
        server.call(lambda: jobrunner.failed_create(server, job, message))


def test_a_pod_the_job_controller_cannot_create_is_explained_from_its_failed_create_event(server, kube):
    run = Run(server, kube)
    run.reconcile()
    run.finish(c.PREPARE)
    run.reconcile()
    train = run.job(c.TRAIN)
    other = Run(server, kube)  # another run's Job, and an Event of it, are not this one's
    other.reconcile()
    failed_create(server, other.job(c.PREPARE), "somebody else's", count=9)
    refusal = jobrunner.quota_refusal(f'pods "{run.name}-train-abcde"', "requests.nvidia.com/gpu", 1, 8, 8)
    failed_create(server, train, refusal)
    assert run.reconcile().summary == (c.QUEUED, c.REASON_STARTING), "within the grace: no Event is read"
    assert not run.made("GET", r"/events$")
    now = replace(SETTINGS, pod_create_grace_seconds=0)  # the grace has passed
    derived = run.reconcile(settings=now)
    assert derived.summary == (c.QUEUED, c.REASON_QUOTA)
    assert f'pods "{run.name}-train-abcde" is forbidden: exceeded quota: gpu-quota' in derived.message
    assert "Free room in that ResourceQuota" in derived.message
    assert server.made(USER, "GET", r"/namespaces/ml/events$"), "read once the grace has passed"
    assert run.reconcile(settings=now).summary == (c.QUEUED, c.REASON_QUOTA)
    assert [(e["type"], e["reason"]) for e in run.events].count(("Warning", c.REASON_QUOTA)) == 1, "said once"
    run.pod(c.TRAIN)  # the quota has room: the pod is made
    before = len(server.made(USER, "GET", r"/events$"))
    assert run.reconcile(settings=now).summary == (c.RUNNING, c.REASON_TRAINING)
    assert len(server.made(USER, "GET", r"/events$")) == before, "a Job with its pod costs no Event read"


def test_a_run_applied_again_under_its_name_says_its_volume_is_the_earlier_runs(server, kube):
    run = Run(server, kube)
    _kept_volume(server, run, annotations={c.ANNOTATION_RUN_UID: "uid-of-the-deleted-run"})
    derived = run.reconcile()
    assert derived.summary == (c.INITIALIZING, c.REASON_VOLUME_OF_EARLIER_RUN)
    assert f"Volume {run.name}-workspace existed before this run" in derived.message
    assert run.job(c.PREPARE) is not None, "it goes on, on the kept volume"
    assert [(e["type"], e["reason"]) for e in run.events] == [("Normal", c.REASON_VOLUME_OF_EARLIER_RUN)]
    run.pod(c.PREPARE)
    assert run.reconcile().reason == c.REASON_VOLUME_OF_EARLIER_RUN, "said while it prepares"
    run.finish(c.PREPARE)
    assert run.reconcile().summary == (c.QUEUED, c.REASON_STARTING)


def test_a_runs_own_volume_found_again_is_its_own(server, kube):
    run = Run(server, kube)
    run.reconcile()
    claim = server.call(lambda: server.get(server.resource("", "persistentvolumeclaims"), NS, f"{run.name}-workspace"))
    assert claim["metadata"]["annotations"] == {c.ANNOTATION_RUN_UID: run.body()["metadata"]["uid"]}
    server.call(lambda: server.delete(server.resource(*JOBS), NS, f"{run.name}-prepare"))  # before it finished
    assert run.reconcile().summary == (c.INITIALIZING, c.REASON_PREPARING)
    assert run.made("GET", rf"/persistentvolumeclaims/{run.name}-workspace$"), "the 409 was looked into"


def test_a_kueue_run_is_suspended_by_deleting_its_job_and_queued_again_on_resume(server, kube):
    run = Run(server, kube, queueName="team-a")
    run.reconcile()
    run.finish(c.PREPARE)
    run.reconcile()
    job = run.job(c.TRAIN)
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][c.LABEL_KUEUE_QUEUE] == "team-a"
    admit = lambda o: merge_patch(o, {"spec": {"suspend": False}})  # noqa: E731 - what Kueue does
    server.call(lambda: server.update(server.resource(*JOBS), NS, f"{run.name}-train", admit))
    run.pod(c.TRAIN)
    assert run.reconcile().phase == c.RUNNING
    run.patch_spec(suspend=True)
    assert run.reconcile().summary == (c.SUSPENDED, c.REASON_SUSPENDING), "the trainer is saving its checkpoint"
    assert run.job(c.TRAIN) is None, "deleted: Kueue would start a suspended admitted Job again"
    assert not run.made("PATCH", rf"/jobs/{run.name}-train$"), "never suspended"
    run.stop_pods()
    assert run.reconcile().summary == (c.SUSPENDED, c.REASON_SUSPENDED)
    run.patch_spec(suspend=False)
    assert run.reconcile().summary == (c.QUEUED, c.REASON_KUEUE)
    assert run.job(c.TRAIN)["spec"]["suspend"] is True
    assert run.status["restarts"] == 0


def test_a_quick_resume_waits_for_the_deleted_jobs_trainer_before_making_a_new_job(server, kube):
    """Deleting a Job (Background propagation) frees its name at once while its pod still checkpoints on
    SIGTERM: a new training Job then would start a second trainer on the same volume."""
    run = Run(server, kube, queueName="team-a")
    run.reconcile()
    run.finish(c.PREPARE)
    run.reconcile()
    admit = lambda o: merge_patch(o, {"spec": {"suspend": False}})  # noqa: E731 - what Kueue does
    server.call(lambda: server.update(server.resource(*JOBS), NS, f"{run.name}-train", admit))
    run.pod(c.TRAIN)
    assert run.reconcile().phase == c.RUNNING
    run.patch_spec(suspend=True)
    run.reconcile()
    (old,) = [p for p in run.pods() if p["metadata"].get("deletionTimestamp")]
    run.patch_spec(suspend=False)  # at once: the old trainer is still saving
    for _ in range(2):  # and again on the next resync
        waiting = run.reconcile()
        assert waiting.summary == (c.QUEUED, c.REASON_OLD_PODS)
        assert f"Waiting for pod {old['metadata']['name']}, left from an earlier Job of this run" in waiting.message
        assert run.job(c.TRAIN) is None, "no second trainer on the volume"
    run.stop_pods()
    assert run.reconcile().summary == (c.QUEUED, c.REASON_KUEUE)
    assert run.job(c.TRAIN) is not None
    assert [e["reason"] for e in run.events][-3:] == [c.REASON_SUSPENDING, c.REASON_OLD_PODS, c.REASON_KUEUE]


def test_a_stale_body_makes_no_second_status_patch_or_event(server, kube):
    """Watch events can deliver a body from before the operator's last patch; the pass must not redo it."""
    run = Run(server, kube)
    stale = run.body()
    for _ in range(3):
        run.reconcile(copy.deepcopy(stale))
    assert len(run.made("PATCH", rf"/trainingruns/{run.name}/status$")) == 1
    assert [e["reason"] for e in run.events] == ["Preparing"]


def test_a_run_whose_spec_turns_invalid_while_training_is_stopped_until_it_is_valid_again(server, kube):
    run = Run(server, kube)
    run.reconcile()
    run.finish(c.PREPARE)
    run.reconcile()
    run.pod(c.TRAIN)
    run.patch_spec(maxRestarts=-1)  # an old CRD without the schema's minimum lets this through
    stopped = run.reconcile()
    assert stopped.summary == (c.SUSPENDED, c.REASON_INVALID_SPEC)
    assert "spec.maxRestarts" in stopped.message and "This can be undone" in stopped.message
    assert run.job(c.TRAIN)["spec"]["suspend"] is True
    run.patch_spec(maxRestarts=3)
    run.reconcile()
    assert run.job(c.TRAIN)["spec"]["suspend"] is False


def test_a_kueue_run_whose_spec_turns_invalid_has_its_job_deleted(server, kube):
    run = Run(server, kube, queueName="team-a")
    run.reconcile()
    run.finish(c.PREPARE)
    run.reconcile()
    run.patch_spec(maxRestarts=-1)
    assert run.reconcile().summary == (c.SUSPENDED, c.REASON_INVALID_SPEC)
    assert run.job(c.TRAIN) is None


def _kept_volume(server, run, **meta) -> None:
    claim = {
        "metadata": {"name": f"{run.name}-workspace", "labels": {c.LABEL_RUN: run.name}, **meta},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    server.call(lambda: server.create(server.resource("", "persistentvolumeclaims"), NS, claim))


def test_a_run_that_deletes_its_volume_does_not_take_over_a_kept_one(server, kube):
    run = Run(server, kube, storage={"deleteWithRun": True})
    _kept_volume(server, run, annotations={c.ANNOTATION_RUN_UID: "uid-of-the-deleted-run"})
    with pytest.raises(ChildBlocked):
        run.reconcile()
    assert run.status["reason"] == c.REASON_BLOCKED
    assert f"kubectl -n {NS} delete persistentvolumeclaim {run.name}-workspace" in run.status["message"]
    assert "spec.storage.deleteWithRun: false" in run.status["message"]
    claim = server.call(lambda: server.get(server.resource("", "persistentvolumeclaims"), NS, f"{run.name}-workspace"))
    assert not claim["metadata"].get("ownerReferences"), "not adopted: deleting this run would delete it"
    assert run.job(c.PREPARE) is None


def test_a_run_that_keeps_its_volume_waits_for_one_the_garbage_collector_is_removing(server, kube):
    run = Run(server, kube)
    owner = {"apiVersion": "kubetune.io/v1alpha1", "kind": "TrainingRun", "name": run.name, "uid": "0ld-0wner"}
    _kept_volume(server, run, finalizers=["kubetune.test/hold"], ownerReferences=[{**owner, "controller": True}])
    with pytest.raises(ChildBlocked):
        run.reconcile()
    assert (
        f"PersistentVolumeClaim {run.name}-workspace still exists from an earlier TrainingRun"
        in (run.status["message"])
    )
    assert run.job(c.PREPARE) is None, "no Job on a volume about to be deleted"


def test_a_deleted_runs_children_are_not_adopted_by_a_new_run_of_the_same_name(server, kube):
    run = Run(server, kube)
    owner = {"apiVersion": "kubetune.io/v1alpha1", "kind": "TrainingRun", "name": run.name, "uid": "0ld-0wner"}
    template = {"template": {"spec": {"containers": [{"name": "x", "image": "x"}], "restartPolicy": "Never"}}}
    for plural, group, suffix, rest in (
        ("configmaps", "", "config", {}),
        ("jobs", "batch", "prepare", {"spec": template}),
    ):
        body = {
            "metadata": {
                "name": f"{run.name}-{suffix}",
                "labels": {c.LABEL_RUN: run.name},
                "finalizers": ["kubetune.test/hold"],  # the garbage collector has not got to it yet
                "ownerReferences": [{**owner, "controller": True}],
            },
            **rest,
        }
        res = server.resource(group, plural)
        server.call(lambda res=res, body=body: server.create(res, NS, body))
    with pytest.raises(ChildBlocked):
        run.reconcile()
    assert run.status["reason"] == c.REASON_BLOCKED
    assert f"ConfigMap {run.name}-config still exists from an earlier TrainingRun" in run.status["message"]
    assert run.made("GET", rf"/configmaps/{run.name}-config$"), "the 409 was looked into"
    for plural, group, name in (("configmaps", "", "config"), ("jobs", "batch", "prepare")):
        res = server.resource(group, plural)
        server.call(lambda res=res, name=name: server.delete(res, NS, f"{run.name}-{name}"))
        release = lambda o: merge_patch(o, {"metadata": {"finalizers": None}})  # noqa: E731
        server.call(lambda res=res, name=name, release=release: server.update(res, NS, f"{run.name}-{name}", release))
    assert run.reconcile().phase == c.INITIALIZING
    own = run.body()["metadata"]["uid"]
    assert run.job(c.PREPARE)["metadata"]["ownerReferences"][0]["uid"] == own


def test_pods_of_another_job_with_the_same_name_are_not_the_runs(server, kube):
    run = Run(server, kube)
    run.reconcile()
    run.finish(c.PREPARE)
    run.reconcile()
    run.pod(c.TRAIN, "Failed", 1, owner="replaced-job-uid")  # left from a Job of the same name
    assert run.reconcile().summary == (c.QUEUED, "Starting")
    assert run.status["restarts"] == 0


# --------------------------------------------------------------------------- errors, through on_run


@pytest.fixture
def memo(kube) -> kopf.Memo:
    memo = kopf.Memo()
    memo.kube, memo.settings, memo.runs = kube, SETTINGS, handlers.Runs()
    memo.metrics = OperatorMetrics(lambda: [])
    memo.post_event = lambda *_, **__: None
    return memo


def on_run(run: Run, memo: kopf.Memo, retry: int = 0) -> None:
    handlers.on_run(body=run.body(), name=run.name, namespace=NS, memo=memo, retry=retry)


def test_a_server_error_is_retried_by_kopf_with_backoff(server, kube, memo):
    run = Run(server, kube)
    server.call(lambda: server.fail("POST", rf"/namespaces/{NS}/jobs$", status=500, times=1))
    with pytest.raises(kopf.TemporaryError) as raised:
        on_run(run, memo, retry=3)
    assert raised.value.delay == 8
    assert run.status.get("phase") != c.FAILED
    on_run(run, memo)  # kopf's retry
    assert run.status["phase"] == c.INITIALIZING


@pytest.mark.parametrize(
    ("code", "says"), [(422, "Fix the spec in a new TrainingRun"), (403, "Check the operator's RBAC")]
)
def test_a_refused_child_fails_the_run_for_good_with_the_servers_words(server, kube, memo, code, says):
    run = Run(server, kube)
    words = 'Job.batch "x" is invalid: spec.template.spec.tolerations[0].operator: Invalid value: "Equal"'
    server.call(lambda: server.fail("POST", rf"/namespaces/{NS}/jobs$", status=code, times=1, message=words))
    with pytest.raises(kopf.PermanentError):
        on_run(run, memo)
    status = run.status
    assert (status["phase"], status["reason"]) == (c.FAILED, c.REASON_CREATE_FAILED)
    assert f"refused to create Job {run.name}-prepare ({code}): {words}" in status["message"]
    assert says in status["message"]
    on_run(run, memo)  # terminal: nothing more is tried
    assert len(run.made("POST", rf"/namespaces/{NS}/jobs$")) == 1


def error(status: int, message: str = "") -> ApiException:
    exc = ApiException(status=status, reason="x")
    exc.body = json.dumps({"message": message})
    return exc


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (error(500), True),
        (error(503), True),
        (error(429), True),
        (error(403, "forbidden"), False),
        (error(409), False),
        (error(422), False),
        (ApiTypeError("Got an unexpected keyword argument"), False),
        (ConnectionRefusedError(), True),
        (CreateRefused("Job", "x", 422, "bad"), False),
    ],
)
def test_what_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_a_run_applied_again_under_its_name_starts_afresh_when_the_operator_missed_the_deletion(server, kube, memo):
    """What the operator remembers of a run (its last status, its pods) belongs to that run's uid: a run of the
    same name applied after a deletion whose DELETED event was missed must not inherit the old run's status."""
    old = Run(server, kube)
    on_run(old, memo)
    old.finish(c.PREPARE)
    on_run(old, memo)
    old.finish(c.TRAIN)
    on_run(old, memo)
    assert old.status["phase"] == c.SUCCEEDED
    server.call(lambda: server.delete(server.resource(*RUNS), NS, old.name))  # remember_run never hears of it
    new = Run(server, kube, name=old.name)
    on_run(new, memo)
    # Its own status; the volume the old run kept is the one thing it shares, and it says so.
    assert (new.status["phase"], new.status["reason"]) == (c.INITIALIZING, c.REASON_VOLUME_OF_EARLIER_RUN)
    assert new.job(c.PREPARE)["metadata"]["ownerReferences"][0]["uid"] == new.body()["metadata"]["uid"]


def test_a_run_waiting_on_a_full_quota_is_counted_as_waiting_not_as_an_operator_error(server, kube, memo):
    """A ResourceQuota is the user's side: KubetuneOperatorReconcileErrors must not fire for it."""
    run = Run(server, kube)
    quota = jobrunner.quota_refusal('jobs.batch "x"', "count/jobs.batch", 1, 10, 10, quota="team-a")
    server.call(lambda: server.fail("POST", rf"/namespaces/{NS}/jobs$", status=403, times=2, message=quota))
    with pytest.raises(kopf.TemporaryError):
        on_run(run, memo)
    with pytest.raises(ChildBlocked):  # the resync's pass
        handlers._reconcile_locked(memo, run.body(), "resync")
    assert (run.status["phase"], run.status["reason"]) == (c.PENDING, c.REASON_QUOTA)
    count = memo.metrics.registry.get_sample_value
    for trigger in ("run", "resync"):
        assert count("kubetune_operator_reconciles_total", {"trigger": trigger, "result": "waiting"}) == 1
        assert count("kubetune_operator_reconciles_total", {"trigger": trigger, "result": "error"}) is None
    on_run(run, memo)  # the quota has room again
    assert run.status["phase"] == c.INITIALIZING


# --------------------------------------------------------------------------- a stale body, through the handlers


def test_a_job_event_acts_on_the_newest_spec_not_the_one_it_took_before_waiting_for_the_lock(server, kube, memo):
    """on_job takes the run's body, then waits for the run's lock, held by the pass of a spec update that suspends
    the run: once it has the lock, acting on the body it took would unsuspend the Job just suspended."""
    run = Run(server, kube)
    for step in (lambda: None, lambda: run.finish(c.PREPARE), lambda: run.pod(c.TRAIN)):
        step()
        on_run(run, memo)
    assert run.status["phase"] == c.RUNNING
    key = (NS, run.name)
    lock = memo.runs.lock(key)

    class HeldBySpecUpdate:
        """The run's lock, as the Job event's pass finds it: held by the pass of `suspend: true`, which ends first."""

        def __init__(self) -> None:
            self.updated = False

        def __enter__(self) -> None:
            if not self.updated:
                self.updated = True
                run.patch_spec(suspend=True)
                on_run(run, memo)
            lock.acquire()

        def __exit__(self, *_: Any) -> None:
            lock.release()

    memo.runs._locks[key] = HeldBySpecUpdate()
    job = run.job(c.TRAIN)
    handlers.on_job(namespace=NS, name=job["metadata"]["name"], labels=job["metadata"]["labels"], meta={}, memo=memo)
    assert run.job(c.TRAIN)["spec"]["suspend"] is True, "not unsuspended by a pass on the older spec"
    assert run.status["phase"] == c.SUSPENDED


def test_a_resync_acts_on_the_newest_spec_not_the_one_its_sweep_started_with(server, kube, memo):
    run = Run(server, kube)
    for step in (lambda: None, lambda: run.finish(c.PREPARE), lambda: run.pod(c.TRAIN)):
        step()
        on_run(run, memo)
    swept = copy.deepcopy(memo.runs.bodies[(NS, run.name)])  # the sweep's list, taken before the update
    run.patch_spec(maxRestarts=7)
    on_run(run, memo)
    assert run.job(c.TRAIN)["spec"]["backoffLimit"] == 7
    handlers._reconcile_locked(memo, swept, "resync")
    assert run.job(c.TRAIN)["spec"]["backoffLimit"] == 7, "not put back to the older spec's 3"
    memo.runs.forget((NS, run.name))  # deleted meanwhile: nothing to do
    assert handlers._reconcile_locked(memo, swept, "resync") is None
