"""The operator really runs: kopf against the API server emulator over HTTP, and a job runner that
runs each Job's pod (kubetune-train, really training the tiny model) as a subprocess."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest

from tests.operator.conftest import NAMESPACE, OPERATOR_USER, tiny_spec, wait_for
from tests.operator.emulator import merge_patch

pytestmark = pytest.mark.slow


def train_pod(cluster: Any, run: str, phase: str = "Running") -> dict[str, Any]:
    return wait_for(
        lambda: next(
            (
                p
                for p in cluster.pods(f"{run}-train")
                if p.get("status", {}).get("phase") == phase and not p["metadata"].get("deletionTimestamp")
            ),
            None,
        ),
        120,
        f"a {phase} training pod of {run}",
    )


def event_reasons(cluster: Any, run: str, until: str) -> list[str] | None:
    """The reasons of the run's Events, once one with `until` is among them (kopf posts from a queue)."""
    reasons = [e["reason"] for e in cluster.events(run)]
    return reasons if until in reasons else None


def wait_log(cluster: Any, pod: dict[str, Any], pattern: str, timeout: float = 120) -> re.Match:
    name = pod["metadata"]["name"]
    return wait_for(
        lambda: re.search(pattern, cluster.runner.pod_log(NAMESPACE, name)),
        timeout,
        f"{pattern!r} in the log of {name}",
    )


def test_a_run_goes_from_apply_to_succeeded_with_the_adapter_on_its_volume(cluster, operator, seed):
    seed(cluster.workspace("hello"))
    cluster.apply_run("hello", tiny_spec())
    status = cluster.wait_phase("hello", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    assert status["reason"] == "Completed"
    assert status["output"] == {"volume": "hello-workspace", "path": "/workspace/output"}
    assert status["jobName"] == "hello-train"
    assert status["restarts"] == 0
    assert status["startTime"] <= status["completionTime"]
    conditions = {x["type"]: x["status"] for x in status["conditions"]}
    assert conditions == {
        "Initialized": "True",
        "Running": "False",
        "Suspended": "False",
        "Succeeded": "True",
        "Failed": "False",
    }

    adapter = cluster.workspace("hello") / "output" / "adapter_model.safetensors"
    assert adapter.is_file(), "the adapter is on the run's volume"
    assert (cluster.workspace("hello") / "prepared" / "prepared.json").is_file(), "prepare tokenized the data"
    train_log = cluster.runner.pod_log(NAMESPACE, cluster.pods("hello-train")[0]["metadata"]["name"])
    assert "Using the prepared data" in train_log

    # kopf posts events from a queue: the last can land just after the status.
    reasons = wait_for(lambda: event_reasons(cluster, "hello", until="Completed"), 30, "the Completed event")
    assert reasons[0] in ("Creating", "Preparing")
    assert "Training" in reasons
    assert reasons[-1] == "Completed"
    assert all(a != b for a, b in itertools.pairwise(reasons)), f"one Event per transition: {reasons}"
    # One status patch per change, none repeated (a stale cached body once sent the same patch again).
    patches = [r.body for r in cluster.server.made(OPERATOR_USER, "PATCH", r"/trainingruns/hello/status$", 200)]
    assert len(patches) <= len(reasons) + 2, patches
    assert all(a != b for a, b in itertools.pairwise(patches)), "no patch repeats the one before"
    job = next(j for j in cluster.children("jobs", "hello", "batch") if j["metadata"]["name"] == "hello-train")
    assert status["startTime"] == job["status"]["startTime"], "the Job's start, not when the operator looked"
    assert status["completionTime"] == job["status"]["completionTime"]

    owned = [
        *cluster.children("configmaps", "hello"),
        *cluster.children("jobs", "hello", "batch"),
        *cluster.children("serviceaccounts", "hello"),
        *cluster.children("roles", "hello", "rbac.authorization.k8s.io"),
    ]
    assert all(o["metadata"]["ownerReferences"][0]["name"] == "hello" for o in owned)


def test_a_run_with_a_ttl_prepares_once_and_stays_succeeded_when_its_jobs_go_and_its_spec_changes(
    cluster, operator, seed
):
    """ttlSecondsAfterFinished once deleted the finished prepare Job mid-run, and the operator prepared
    again on the same volume; and a spec change re-ran a finished run whose Jobs were gone. Also: API
    failures on the way are retried, and the trainer's status fields survive every operator patch."""
    seed(cluster.workspace("ttl"))
    cluster.server.call(lambda: cluster.server.fail("POST", r"/namespaces/ml/jobs$", status=500, times=2))
    cluster.apply_run("ttl", tiny_spec(ttlSecondsAfterFinished=1))
    status = cluster.wait_phase("ttl", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    assert cluster.server.call(lambda: [f[3] for f in cluster.server.faults]) == [0], "both failures happened"
    # The trainer's fields, as its status sink wrote them, survive every operator patch.
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 12
    assert status["progress"]["percent"] == 100.0 and status["progress"]["eta"] == "0s"
    assert status["checkpoint"]["latest"]["step"] == 12
    assert status["preflight"]["passed"] is True
    assert status["evaluation"]["evalLoss"] > 0

    wait_for(lambda: cluster.children("jobs", "ttl", "batch") == [], 30, "the TTL to delete both Jobs")
    cluster.patch_run("ttl", {"maxRestarts": 5})
    wait_for(lambda: cluster.status("ttl").get("observedGeneration") == 2, 30, "the operator to see the change")
    status = cluster.status("ttl")
    assert (status["phase"], status["reason"]) == ("Succeeded", "Completed")
    assert cluster.children("jobs", "ttl", "batch") == [], "nothing made again"
    made = [r.body["metadata"]["name"] for r in cluster.server.made(OPERATOR_USER, "POST", r"/jobs$", 201)]
    assert made.count("ttl-prepare") == 1 and made.count("ttl-train") == 1


def test_suspend_checkpoints_and_resume_finishes_from_the_checkpoint(cluster, operator, seed):
    seed(cluster.workspace("pause"))
    cluster.apply_run(
        "pause", tiny_spec(**{"training.maxSteps": 150, "evaluation.evalSteps": 75, "checkpoints.everySteps": 1000})
    )
    first = train_pod(cluster, "pause")
    wait_log(cluster, first, r"step \d+/150 \(")
    cluster.patch_run("pause", {"suspend": True})
    status = cluster.wait_phase("pause", "Suspended")
    wait_for(lambda: cluster.status("pause").get("reason") == "Suspended", 60, "the pod to stop")
    # The emulator removes a deleted pod at once; its process may still be saving.
    stopped = int(wait_log(cluster, first, r"Stopped by SIGTERM at step (\d+)").group(1))
    assert (cluster.workspace("pause") / "checkpoints" / f"checkpoint-{stopped}" / "manifest.json").is_file()
    assert cluster.pods("pause-train") == [], "a suspended Job has no pods"

    cluster.patch_run("pause", {"suspend": False})
    status = cluster.wait_phase("pause", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    second = next(p for p in cluster.pods("pause-train") if p["metadata"]["name"] != first["metadata"]["name"])
    assert f"Resuming from checkpoint-{stopped} (step {stopped}" in cluster.runner.pod_log(
        NAMESPACE, second["metadata"]["name"]
    )
    assert status["restarts"] == 0, "a suspension is not a failure"


def test_waiting_for_a_gpu_then_a_failed_preflight_is_not_retried(cluster, operator, seed):
    seed(cluster.workspace("gpu"))
    cluster.apply_run("gpu", tiny_spec(**{"resources.gpu": 1, "maxRestarts": 3}))
    status = cluster.wait_status("gpu", 120, reason="Unschedulable")
    assert status["phase"] == "Queued"
    assert "Insufficient nvidia.com/gpu" in status["message"]
    assert "spec.resources (gpu, gpuType)" in status["message"]

    cluster.runner.set_capacity("nvidia.com/gpu", 1)  # a GPU frees up; the trainer finds no CUDA in it
    try:
        status = cluster.wait_phase("gpu", "Failed")
    finally:
        cluster.runner.set_capacity("nvidia.com/gpu", 0)
    assert status["reason"] == "PreflightFailed"
    assert "gpu.cuda: 1 GPU(s) requested but CUDA sees none" in status["message"]
    assert len(cluster.pods("gpu-train")) == 1, "a failed preflight is final: no retry"


def test_a_crash_is_retried_until_max_restarts_and_raising_it_retries_the_run(cluster, operator, seed):
    seed(cluster.workspace("crash"))
    cluster.apply_run("crash", tiny_spec(**{"training.maxSteps": 600, "maxRestarts": 1}))
    for attempt in (1, 2):
        pod = train_pod(cluster, "crash")
        wait_log(cluster, pod, r"step \d+/600 \(" if attempt == 1 else r"Saved checkpoint-\d+")
        cluster.runner.crash(NAMESPACE, pod["metadata"]["name"])
        if attempt == 1:
            wait_for(lambda: cluster.status("crash").get("restarts") == 1, 60, "the first restart to count")
    status = cluster.wait_phase("crash", "Failed")
    assert status["reason"] == "BackoffLimitExceeded"
    assert "failed 2 time(s), more than its limit of 1 restart(s) allows" in status["message"]
    assert "exited with code 137" in status["message"]
    assert "raise spec.maxRestarts" in status["message"]
    assert status["restarts"] == 1, "the final failure was not replaced"
    assert len(cluster.pods("crash-train")) == 2
    failed_job = cluster.children("jobs", "crash", "batch")

    # What the message says: raising maxRestarts retries the run, from its newest checkpoint.
    cluster.patch_run("crash", {"maxRestarts": 2})
    third = train_pod(cluster, "crash")
    assert third["metadata"]["ownerReferences"][0]["uid"] not in {j["metadata"]["uid"] for j in failed_job}
    wait_log(cluster, third, r"Resuming from checkpoint-\d+")
    status = cluster.wait_phase("crash", "Running")
    assert status["restarts"] == 2 and "completionTime" not in status
    reasons = wait_for(lambda: event_reasons(cluster, "crash", until="Retrying"), 30, "the Retrying event")
    assert reasons[reasons.index("BackoffLimitExceeded") + 1] == "Retrying"

    # A mutable field reaches the running Job: a deadline already passed stops it.
    cluster.patch_run("crash", {"activeDeadlineSeconds": 1})
    status = cluster.wait_phase("crash", "Failed")
    assert status["reason"] == "DeadlineExceeded"
    assert "ran past spec.activeDeadlineSeconds=1" in status["message"]
    job = next(j for j in cluster.children("jobs", "crash", "batch") if j["metadata"]["name"] == "crash-train")
    assert (job["spec"]["backoffLimit"], job["spec"]["activeDeadlineSeconds"]) == (2, 1)


def test_an_oom_killed_trainer_fails_as_out_of_memory(cluster, operator, seed):
    seed(cluster.workspace("oom"))
    cluster.apply_run("oom", tiny_spec(**{"training.maxSteps": 600, "maxRestarts": 0}))
    pod = train_pod(cluster, "oom")
    wait_log(cluster, pod, r"step \d+/600 \(")
    cluster.runner.oom_kill(NAMESPACE, pod["metadata"]["name"])
    status = cluster.wait_phase("oom", "Failed")
    assert status["reason"] == "OutOfMemory"
    assert "spec.resources.memory=2Gi" in status["message"]


def test_an_evicted_pod_is_replaced_without_spending_a_restart(cluster, operator, seed):
    seed(cluster.workspace("evict"))
    cluster.apply_run("evict", tiny_spec(**{"training.maxSteps": 150, "evaluation.evalSteps": 75, "maxRestarts": 0}))
    pod = train_pod(cluster, "evict")
    wait_log(cluster, pod, r"step \d+/150 \(")
    cluster.runner.evict(NAMESPACE, pod["metadata"]["name"])
    status = cluster.wait_phase("evict", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    assert status["restarts"] == 1
    replacement = next(p for p in cluster.pods("evict-train") if p["metadata"]["name"] != pod["metadata"]["name"])
    assert "Resuming from checkpoint-" in cluster.runner.pod_log(NAMESPACE, replacement["metadata"]["name"])


def test_an_invalid_spec_fails_with_the_field_and_creates_nothing(cluster, operator):
    cluster.apply_run("bad", tiny_spec(**{"lora.r": 0, "training.learningRate": "fast"}))
    status = cluster.wait_phase("bad", "Failed")
    assert status["reason"] == "InvalidSpec"
    assert "spec.lora.r: Input should be greater than or equal to 1" in status["message"]
    assert "spec.training.learningRate" in status["message"]
    assert "Fix it in a new TrainingRun" in status["message"]
    assert cluster.children("jobs", "bad", "batch") == []
    assert cluster.children("configmaps", "bad") == []


def test_a_trainer_config_error_reaches_the_status_in_its_own_words(cluster, operator, seed):
    seed(cluster.workspace("nodata"))
    cluster.apply_run("nodata", tiny_spec(**{"dataset.path": "data/missing.jsonl"}))
    status = cluster.wait_phase("nodata", "Failed")
    assert status["reason"] == "InvalidSpec"
    assert "dataset.path: file not found: data/missing.jsonl" in status["message"]
    assert len(cluster.pods("nodata-prepare")) == 1, "an invalid config is not retried"


def test_a_queued_run_waits_for_kueue_and_suspends_without_fighting_it(cluster, operator, seed):
    seed(cluster.workspace("queued"))
    cluster.apply_run(
        "queued",
        tiny_spec(
            queueName="team-a",
            **{"training.maxSteps": 150, "evaluation.evalSteps": 75, "checkpoints.everySteps": 1000},
        ),
    )
    status = cluster.wait_status("queued", 120, phase="Queued")
    assert status["reason"] == "WaitingForAdmission"
    train = next(j for j in cluster.children("jobs", "queued", "batch") if j["metadata"]["name"] == "queued-train")
    assert train["spec"]["suspend"] is True
    assert train["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert cluster.pods("queued-train") == []
    assert {x["type"]: x["status"] for x in status["conditions"]}["Admitted"] == "False"

    # Kueue admits the workload by unsuspending the Job, and unsuspends it again if anyone suspends it.
    cluster.runner.open_queue("team-a")
    first = train_pod(cluster, "queued")
    wait_log(cluster, first, r"step \d+/150 \(")
    assert {x["type"]: x["status"] for x in cluster.status("queued")["conditions"]}["Admitted"] == "True"

    # Suspending deletes the Job (its pod saves a checkpoint on SIGTERM); a suspended Job would be restarted.
    # The trainer is held mid-step, so it is still running on the volume when the run is resumed at once.
    cluster.runner.hold(NAMESPACE, first["metadata"]["name"])
    try:
        cluster.patch_run("queued", {"suspend": True})
        wait_for(lambda: cluster.status("queued").get("reason") == "Suspending", 60, "Suspended/Suspending")
        jobs = lambda: [j["metadata"]["name"] for j in cluster.children("jobs", "queued", "batch")]  # noqa: E731
        assert jobs() == ["queued-prepare"]
        cluster.patch_run("queued", {"suspend": False})
        status = cluster.wait_status("queued", 60, reason="WaitingForOldPods")
        assert status["phase"] == "Queued" and first["metadata"]["name"] in status["message"]
        assert jobs() == ["queued-prepare"], "no second trainer on the volume while the first still runs"
    finally:
        cluster.runner.release(NAMESPACE, first["metadata"]["name"])
    stopped = int(wait_log(cluster, first, r"Stopped by SIGTERM at step (\d+)").group(1))

    # Once it has stopped, the Job is made again, suspended for Kueue to admit; it resumes from the checkpoint.
    status = cluster.wait_phase("queued", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    second = next(p for p in cluster.pods("queued-train") if p["metadata"]["name"] != first["metadata"]["name"])
    assert f"Resuming from checkpoint-{stopped} (step {stopped}" in cluster.runner.pod_log(
        NAMESPACE, second["metadata"]["name"]
    )
    assert status["restarts"] == 0, "a suspension is not a failure"
    reasons = [e["reason"] for e in cluster.events("queued")]
    assert reasons[reasons.index("Suspending") :][:2] == ["Suspending", "WaitingForOldPods"], reasons


def test_an_image_that_cannot_be_pulled_fails_the_run_and_stops_its_job(cluster, operator, seed):
    cluster.apply_run("noimage", tiny_spec(image="Registry.Example/Trainer:1"))
    status = cluster.wait_phase("noimage", "Failed", timeout=60)
    assert status["reason"] == "ImagePullFailed"
    assert "Check spec.image" in status["message"]
    wait_for(lambda: cluster.pods("noimage-prepare") == [], 60, "the stuck pod to be stopped")


def test_deleting_a_run_removes_its_children_but_keeps_the_adapter_volume(cluster, operator, seed):
    seed(cluster.workspace("gone"))
    pvcs = cluster.res("", "persistentvolumeclaims")
    cluster.apply_run("gone", tiny_spec())
    cluster.wait_phase("gone", "Succeeded", "Failed")
    cluster.delete_run("gone")
    for plural, group in (
        ("jobs", "batch"),
        ("configmaps", ""),
        ("serviceaccounts", ""),
        ("roles", "rbac.authorization.k8s.io"),
        ("rolebindings", "rbac.authorization.k8s.io"),
    ):
        wait_for(
            lambda plural=plural, group=group: cluster.children(plural, "gone", group) == [],
            30,
            f"the run's {plural} to go",
        )
    wait_for(lambda: cluster.pods("gone-train") == [], 30, "the pods to go")
    assert cluster.server.call(lambda: cluster.server.get(pvcs, NAMESPACE, "gone-workspace")), "the volume stays"
    assert (cluster.workspace("gone") / "output" / "adapter_model.safetensors").is_file()


def test_runs_sharing_an_existing_claim_keep_their_checkpoints_and_adapters_apart(cluster, operator, seed):
    """Two runs on one claim of the user's, with the default relative paths: each trains from scratch and
    exports its own adapter, under runs/<run>/; the data and the model on the claim are shared."""
    claim = cluster.runner.volume(NAMESPACE, "team-data")
    seed(claim)
    runs = ("shared-a", "shared-b")
    for run in runs:
        cluster.apply_run(run, tiny_spec(**{"storage.existingClaim": "team-data"}))
    for run in runs:
        status = cluster.wait_phase(run, "Succeeded", "Failed")
        assert status["phase"] == "Succeeded", status
        assert status["output"] == {"volume": "team-data", "path": f"/workspace/runs/{run}/output"}
        assert f"in /workspace/runs/{run}/output" in status["message"]
        own = claim / "runs" / run
        assert (own / "output" / "adapter_model.safetensors").is_file()
        assert (own / "prepared" / "prepared.json").is_file()
        assert (own / "checkpoints" / "checkpoint-12" / "manifest.json").is_file()
        log = cluster.runner.pod_log(NAMESPACE, cluster.pods(f"{run}-train")[0]["metadata"]["name"])
        assert "Resuming from" not in log, "trained from scratch, not from the other run's checkpoint"
    assert not {"output", "checkpoints", "prepared"} & {p.name for p in claim.iterdir()}


def test_an_operator_restart_while_the_trainer_runs_creates_nothing_and_the_run_succeeds(cluster, operator, seed):
    """The operator restarts while a trainer pod runs (held mid-step, so it cannot finish meanwhile), and a
    mutable field was changed while it was down: the new operator adopts the live Job, makes nothing again."""
    seed(cluster.workspace("restart"))
    cluster.apply_run(
        "restart", tiny_spec(**{"training.maxSteps": 100, "evaluation.evalSteps": 50, "checkpoints.everySteps": 1000})
    )
    pod = train_pod(cluster, "restart")
    wait_log(cluster, pod, r"step \d+/100 \(")
    cluster.wait_phase("restart", "Running")
    name = pod["metadata"]["name"]
    cluster.runner.hold(NAMESPACE, name)
    try:
        operator.stop()
        cluster.patch_run("restart", {"maxRestarts": 5})
        since = len(cluster.server.log)
        operator.start()

        def train_job() -> dict[str, Any]:
            return next(
                j for j in cluster.children("jobs", "restart", "batch") if j["metadata"]["name"] == "restart-train"
            )

        wait_for(lambda: train_job()["spec"]["backoffLimit"] == 5, 60, "the new operator to reach the live Job")
        status = cluster.wait_status("restart", 60, observedGeneration=2)
        assert (status["phase"], status["reason"]) == ("Running", "Training")
        live = cluster.pods("restart-train")
        assert [p["metadata"]["name"] for p in live] == [name] and live[0]["status"]["phase"] == "Running"
    finally:
        cluster.runner.release(NAMESPACE, name)
    status = cluster.wait_phase("restart", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    made = [
        r
        for r in cluster.server.log[since:]
        if r.user == OPERATOR_USER and r.method == "POST" and r.status == 201 and not r.path.endswith("/events")
    ]
    assert made == [], "after the restart nothing was created again (not even tried and answered 409)"
    assert not [r for r in cluster.server.log[since:] if r.user == OPERATOR_USER and r.status == 409]
    names = sorted(j["metadata"]["name"] for j in cluster.children("jobs", "restart", "batch"))
    assert names == ["restart-prepare", "restart-train"]
    assert [p["metadata"]["name"] for p in cluster.pods("restart-train")] == [name], "the same trainer finished"
    assert status["restarts"] == 0


def test_a_missing_secret_is_named_in_the_status_until_it_exists(cluster, operator):
    cluster.apply_run("secret", tiny_spec(hfTokenSecret={"name": "hf", "key": "token"}))
    status = cluster.wait_status("secret", 60, reason="ContainerConfigError")
    assert status["phase"] == "Initializing"
    assert 'secret "hf" not found' in status["message"]
    assert "spec.hfTokenSecret: Secret hf, key token" in status["message"]
    secrets = cluster.res("", "secrets")
    body = {"metadata": {"name": "hf"}, "stringData": {"token": "t"}}
    cluster.server.call(lambda: cluster.server.create(secrets, NAMESPACE, body))
    wait_for(lambda: cluster.status("secret").get("reason") != "ContainerConfigError", 60, "the pod to start")
    cluster.delete_run("secret")
    wait_for(lambda: cluster.pods("secret-prepare") == [], 30, "the pod to go")


def test_a_new_run_of_a_deleted_runs_name_waits_for_the_old_children_then_deletes_its_volume_with_it(cluster, operator):
    """Children are matched by owner uid, not by name: deleting a run and applying it again at once must not
    adopt the old run's children while the garbage collector still holds them."""
    spec = tiny_spec(image="does-not-exist:1", **{"storage.deleteWithRun": True})  # no pod ever runs
    old = cluster.apply_run("again", spec)
    wait_for(lambda: cluster.children("jobs", "again", "batch"), 60, "the first run's prepare Job")
    held = [
        (cluster.res("", plural), f"again-{suffix}")
        for plural, suffix in (
            ("persistentvolumeclaims", "workspace"),
            ("configmaps", "config"),
            ("serviceaccounts", "trainer"),
        )
    ] + [
        (cluster.res("rbac.authorization.k8s.io", "roles"), "again-trainer"),
        (cluster.res("rbac.authorization.k8s.io", "rolebindings"), "again-trainer"),
        (cluster.res("batch", "jobs"), "again-prepare"),
    ]

    def hold(res: Any, name: str, finalizers: list[str] | None) -> None:
        change = {"metadata": {"finalizers": finalizers}}
        cluster.server.call(lambda: cluster.server.update(res, NAMESPACE, name, lambda o: merge_patch(o, change)))

    for res, name in held:  # the garbage collector has not got to them yet
        hold(res, name, ["kubetune.test/hold"])
    cluster.delete_run("again")
    new = cluster.apply_run("again", spec)
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    status = cluster.wait_status("again", 60, reason="WaitingForOldChildren")
    assert status["phase"] == "Pending"
    assert "ConfigMap again-config still exists from an earlier TrainingRun" in status["message"]
    assert "PersistentVolumeClaim again-workspace" in status["message"]
    for res, name in held[:-1]:
        hold(res, name, None)
    wait_for(lambda: "Job again-prepare" in cluster.status("again").get("message", ""), 60, "the Job to be the last")
    hold(*held[-1], None)

    def owned_by_new() -> bool:
        found = [*cluster.children("jobs", "again", "batch"), *cluster.children("configmaps", "again")]
        return len(found) == 2 and all(
            o["metadata"]["ownerReferences"][0]["uid"] == new["metadata"]["uid"] for o in found
        )

    wait_for(owned_by_new, 60, "the new run's own children")
    pvcs = cluster.res("", "persistentvolumeclaims")
    claim = cluster.server.call(lambda: cluster.server.get(pvcs, NAMESPACE, "again-workspace"))
    assert claim["metadata"]["ownerReferences"][0]["uid"] == new["metadata"]["uid"]

    # deleteWithRun: true: the volume goes with the run.
    cluster.delete_run("again")
    wait_for(lambda: cluster.children("persistentvolumeclaims", "again") == [], 30, "the volume to go")
    wait_for(lambda: cluster.children("jobs", "again", "batch") == [], 30, "the Jobs to go")


def test_a_pod_a_resource_quota_refuses_is_explained_until_the_quota_has_room(cluster, operator, seed):
    """The Job controller cannot create the training pod (the namespace's GPU quota is spent): only the Job's
    FailedCreate Events say so, and the run's status says it in their words."""
    seed(cluster.workspace("quota"))
    cluster.runner.set_quota("requests.nvidia.com/gpu", 0)
    try:
        cluster.apply_run("quota", tiny_spec(**{"resources.gpu": 1}))
        status = cluster.wait_status("quota", 120, reason="QuotaExceeded")
        assert status["phase"] == "Queued"
        assert 'Error creating: pods "quota-train-' in status["message"]
        assert "exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1" in status["message"]
        assert "Free room in that ResourceQuota" in status["message"]
        assert cluster.pods("quota-train") == []
        warned = wait_for(
            lambda: [e for e in cluster.events("quota") if e["reason"] == "QuotaExceeded"], 30, "the Warning Event"
        )
        assert [e["type"] for e in warned] == ["Warning"]
        cluster.runner.set_quota("requests.nvidia.com/gpu", 1)  # room again: the pod is made, and waits for a GPU
        wait_for(lambda: cluster.status("quota").get("reason") == "Unschedulable", 60, "the pod to be created")
    finally:
        cluster.runner.set_quota("requests.nvidia.com/gpu", None)
        cluster.delete_run("quota")
    wait_for(lambda: cluster.pods("quota-train") == [], 30, "the pod to go")


# --------------------------------------------------------------------------- RBAC, from the calls made above


def _granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(v, g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_the_chart_grants_the_operator_exactly_the_calls_it_made(cluster):
    """Runs last: the module's runs have made every kind of call (create, suspend, watch, status, events)."""
    from tests.helm import render
    from tests.operator.conftest import OPERATOR_USER

    called = cluster.server.call(lambda: set(cluster.server.calls[OPERATOR_USER]))
    if ("delete", "batch", "jobs") not in called:
        pytest.skip("needs the module's earlier runs (a retry and a Kueue suspension delete Jobs)")
    from kubetune_operator.kube import CALLS, HELD

    assert set(CALLS) == called, "kube.CALLS lists what the operator calls"
    for values, kind in (({}, "ClusterRole"), ({"watchNamespaces": ["ml", "team-b"]}, "Role")):
        roles = [o for o in render(values) if o["kind"] == kind]
        assert roles, kind
        for role in roles:
            granted = _granted(role["rules"])
            assert called <= granted, f"{kind} lacks {sorted(called - granted)}"
            assert granted <= called | set(HELD), f"{kind} grants unused {sorted(granted - called - set(HELD))}"


def test_the_trainer_calls_only_what_its_run_role_grants(cluster):
    from tests.operator.conftest import TRAINER_USER

    called = cluster.server.call(lambda: set(cluster.server.calls[TRAINER_USER]))
    assert ("patch", "kubetune.io", "trainingruns/status") in called, "the trainers patched their runs' status"
    roles = cluster.server.call(
        lambda: cluster.server.list(cluster.res("rbac.authorization.k8s.io", "roles"), NAMESPACE)
    )
    assert roles, "the operator made a Role per run"
    for role in roles:
        assert called <= _granted(role["rules"]), role["metadata"]["name"]
        assert [rule["resourceNames"] for rule in role["rules"]] == [[role["metadata"]["labels"]["kubetune.io/run"]]]
