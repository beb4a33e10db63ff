"""The operator really runs: kopf against the API server emulator over HTTP, and a job runner that
runs each Job's pod (kubetune-train, really training the tiny model) as a subprocess."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.operator.conftest import NAMESPACE, tiny_spec, wait_for

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
    reasons = wait_for(
        lambda: (
            [e["reason"] for e in cluster.events("hello")]
            if any(e["reason"] == "Completed" for e in cluster.events("hello"))
            else None
        ),
        30,
        "the Completed event",
    )
    assert reasons[0] in ("Creating", "Preparing")
    assert "Training" in reasons
    assert reasons[-1] == "Completed"

    owned = [
        *cluster.children("configmaps", "hello"),
        *cluster.children("jobs", "hello", "batch"),
        *cluster.children("serviceaccounts", "hello"),
        *cluster.children("roles", "hello", "rbac.authorization.k8s.io"),
    ]
    assert all(o["metadata"]["ownerReferences"][0]["name"] == "hello" for o in owned)


def test_api_failures_are_retried_and_the_trainers_status_fields_are_left_alone(cluster, operator, seed):
    seed(cluster.workspace("flaky"))
    cluster.server.call(lambda: cluster.server.fail("POST", r"/namespaces/ml/jobs$", status=500, times=2))
    cluster.apply_run("flaky", tiny_spec())
    status = cluster.wait_phase("flaky", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    # The trainer's fields, as its status sink wrote them, survive every operator patch.
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 12
    assert status["progress"]["percent"] == 100.0 and status["progress"]["eta"] == "0s"
    assert status["checkpoint"]["latest"]["step"] == 12
    assert status["preflight"]["passed"] is True
    assert status["evaluation"]["evalLoss"] > 0
    assert cluster.server.call(lambda: [f[3] for f in cluster.server.faults]) == [0], "both failures happened"


def test_suspend_checkpoints_and_resume_finishes_from_the_checkpoint(cluster, operator, seed):
    seed(cluster.workspace("pause"))
    cluster.apply_run(
        "pause", tiny_spec(**{"training.maxSteps": 600, "evaluation.evalSteps": 300, "checkpoints.everySteps": 1000})
    )
    first = train_pod(cluster, "pause")
    wait_log(cluster, first, r"step \d+/600 \(")
    cluster.patch_run("pause", {"suspend": True})
    status = cluster.wait_phase("pause", "Suspended")
    wait_for(lambda: cluster.status("pause").get("reason") == "Suspended", 60, "the pod to stop")
    log = cluster.runner.pod_log(NAMESPACE, first["metadata"]["name"])
    stopped = int(re.search(r"Stopped by SIGTERM at step (\d+)", log).group(1))
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
    status = wait_for(
        lambda: cluster.status("gpu") if cluster.status("gpu").get("reason") == "Unschedulable" else None,
        120,
        "Queued/Unschedulable",
    )
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


def test_a_crash_is_retried_until_max_restarts(cluster, operator, seed):
    seed(cluster.workspace("crash"))
    cluster.apply_run("crash", tiny_spec(**{"training.maxSteps": 600, "maxRestarts": 1}))
    for attempt in (1, 2):
        pod = train_pod(cluster, "crash")
        wait_log(cluster, pod, r"step \d+/600 \(")
        cluster.runner.crash(NAMESPACE, pod["metadata"]["name"])
        if attempt == 1:
            wait_for(lambda: cluster.status("crash").get("restarts") == 1, 60, "the first restart to count")
    status = cluster.wait_phase("crash", "Failed")
    assert status["reason"] == "BackoffLimitExceeded"
    assert "failed 2 time(s), more than spec.maxRestarts allows" in status["message"]
    assert "exited with code 137" in status["message"]
    assert status["restarts"] == 2
    assert len(cluster.pods("crash-train")) == 2


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
    cluster.apply_run("evict", tiny_spec(**{"training.maxSteps": 600, "maxRestarts": 0}))
    pod = train_pod(cluster, "evict")
    wait_log(cluster, pod, r"step \d+/600 \(")
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
    assert cluster.children("jobs", "bad", "batch") == []
    assert cluster.children("configmaps", "bad") == []


def test_a_trainer_config_error_reaches_the_status_in_its_own_words(cluster, operator, seed):
    seed(cluster.workspace("nodata"))
    cluster.apply_run("nodata", tiny_spec(**{"dataset.path": "data/missing.jsonl"}))
    status = cluster.wait_phase("nodata", "Failed")
    assert status["reason"] == "InvalidSpec"
    assert "dataset.path: file not found: data/missing.jsonl" in status["message"]
    assert len(cluster.pods("nodata-prepare")) == 1, "an invalid config is not retried"


def test_a_queued_run_waits_for_kueue_to_admit_it(cluster, operator, seed):
    seed(cluster.workspace("queued"))
    cluster.apply_run("queued", tiny_spec(queueName="team-a"))
    status = wait_for(
        lambda: cluster.status("queued") if cluster.status("queued").get("phase") == "Queued" else None, 120, "Queued"
    )
    assert status["reason"] == "WaitingForAdmission"
    job = cluster.children("jobs", "queued", "batch")
    train = next(j for j in job if j["metadata"]["name"] == "queued-train")
    assert train["spec"]["suspend"] is True
    assert train["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert cluster.pods("queued-train") == []

    # Kueue admits the workload by unsuspending the Job; the operator must not suspend it again.
    from tests.operator.emulator import merge_patch

    jobs = cluster.res("batch", "jobs")
    cluster.server.call(
        lambda: cluster.server.update(
            jobs, NAMESPACE, "queued-train", lambda o: merge_patch(o, {"spec": {"suspend": False}})
        )
    )
    assert cluster.wait_phase("queued", "Succeeded", "Failed")["phase"] == "Succeeded"


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


def test_an_operator_restart_mid_run_creates_no_duplicates(cluster, operator, seed):
    seed(cluster.workspace("restart"))
    cluster.apply_run("restart", tiny_spec(**{"training.maxSteps": 400}))
    pod = train_pod(cluster, "restart")
    operator.stop()
    wait_log(cluster, pod, r"step \d+/400 \(")
    operator.start()
    status = cluster.wait_phase("restart", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    names = sorted(j["metadata"]["name"] for j in cluster.children("jobs", "restart", "batch"))
    assert names == ["restart-prepare", "restart-train"]
    assert len(cluster.children("configmaps", "restart")) == 1
    assert len(cluster.pods("restart-train")) == 1
    assert status["restarts"] == 0


# --------------------------------------------------------------------------- RBAC, from the calls made above

# The operator creates each run's Role granting get/patch on the run's status; RBAC lets it grant only
# what it holds, so it holds `get` without calling it.
HELD_TO_GRANT = {("get", "kubetune.io", "trainingruns/status")}


def _granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(v, g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_the_chart_grants_the_operator_exactly_the_calls_it_made(cluster):
    """Runs last: the module's runs have made every kind of call (create, suspend, watch, status, events)."""
    from tests.helm import render
    from tests.operator.conftest import OPERATOR_USER

    called = cluster.server.call(lambda: set(cluster.server.calls[OPERATOR_USER]))
    if ("patch", "batch", "jobs") not in called:
        pytest.skip("needs the module's earlier runs (suspend patches a Job)")
    from kubetune_operator.kube import CALLS

    assert set(CALLS) == called, "kube.CALLS lists what the operator calls"
    for values, kind in (({}, "ClusterRole"), ({"watchNamespaces": ["ml", "team-b"]}, "Role")):
        roles = [o for o in render(values) if o["kind"] == kind]
        assert roles, kind
        for role in roles:
            granted = _granted(role["rules"])
            assert called <= granted, f"{kind} lacks {sorted(called - granted)}"
            assert granted <= called | HELD_TO_GRANT, f"{kind} grants unused {sorted(granted - called - HELD_TO_GRANT)}"


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
