"""Child manifests: valid Kubernetes objects with fixed names, owners, least privilege and the failure policy."""

from __future__ import annotations

from importlib import metadata
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune_operator import api, crd, handlers
from kubetune_operator import constants as c
from kubetune_operator import resources as r
from kubetune_operator.status import JobView
from kubetune_trainer.config import parse_config
from tests.helm import KUBE_VERSIONS

RUN = r.RunRef("my-run", "ml", "0b4f7e3a-1111-2222-3333-444455556666")
SETTINGS = r.OperatorSettings(trainer_image="registry.local/kubetune/trainer:0.1.0")
BASE = {"model": {"nameOrPath": "Qwen/Qwen2.5-0.5B-Instruct"}, "dataset": {"path": "data/chat.jsonl"}}
VARIANTS = {
    "defaults": {},
    "cpu only": {"resources": {"gpu": 0, "cpu": 2, "memory": "4Gi"}},
    "existing claim": {"storage": {"existingClaim": "team-data"}},
    "everything": {
        "image": "registry.local/custom:1",
        "imagePullPolicy": "Always",
        "resources": {
            "gpu": 4,
            "gpuResource": "nvidia.com/gpu",
            "gpuType": "NVIDIA-H100-80GB-HBM3",
            "cpu": "32",
            "memory": "256Gi",
        },
        "nodeSelector": {"pool": "training"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]
                }
            }
        },
        "priorityClassName": "training-high",
        "storage": {"size": "500Gi", "storageClassName": "fast", "deleteWithRun": True},
        "env": [
            {"name": "WANDB_MODE", "value": "offline"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        ],
        "hfTokenSecret": {"name": "hf", "key": "token"},
        "suspend": True,
        "queueName": "gpu-queue",
        "maxRestarts": 5,
        "activeDeadlineSeconds": 86400,
        "ttlSecondsAfterFinished": 3600,
        "terminationGracePeriodSeconds": 120,
    },
}


def build(variant: str) -> tuple[api.TrainingRunSpec, list[dict[str, Any]]]:
    spec = api.TrainingRunSpec.model_validate({**BASE, **VARIANTS[variant]})
    return spec, [*r.base_children(RUN, spec, SETTINGS), r.train_job(RUN, spec, SETTINGS)]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_validates(variant, version):
    for manifest in build(variant)[1]:
        kubernetes_validate.validate(manifest, version, strict=True)


def by_kind(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for m in manifests:
        key = m["kind"] if m["kind"] != "Job" else m["metadata"]["name"]
        out[key] = m
    return out


def test_names_are_fixed_and_fit_even_for_the_longest_run_name():
    long_run = r.RunRef("r" * c.MAX_RUN_NAME, "ml", "uid")
    spec = api.TrainingRunSpec.model_validate(BASE)
    for m in [*r.base_children(long_run, spec, SETTINGS), r.train_job(long_run, spec, SETTINGS)]:
        assert m["metadata"]["name"].startswith(long_run.name + "-")
        assert len(m["metadata"]["name"]) <= 63
    assert r.base_children(RUN, spec, SETTINGS) == r.base_children(RUN, spec, SETTINGS), "pure: same in, same out"


def test_every_child_but_the_volume_goes_with_the_run():
    _, manifests = build("defaults")
    for m in manifests:
        owners = m["metadata"].get("ownerReferences", [])
        if m["kind"] == "PersistentVolumeClaim":
            assert owners == [], "the adapter's volume outlives the run unless asked"
            assert m["metadata"]["annotations"] == {c.ANNOTATION_RUN_UID: RUN.uid}, "a later run can tell"
        else:
            assert owners == [RUN.owner_reference()]
        assert m["metadata"]["labels"][c.LABEL_RUN] == RUN.name
    claim = by_kind(build("everything")[1])["PersistentVolumeClaim"]
    assert claim["metadata"]["ownerReferences"] == [RUN.owner_reference()]  # deleteWithRun
    assert claim["spec"]["storageClassName"] == "fast"


def test_existing_claim_is_mounted_and_no_volume_is_made():
    kinds = by_kind(build("existing claim")[1])
    assert "PersistentVolumeClaim" not in kinds
    for job in ("my-run-prepare", "my-run-train"):
        volumes = {v["name"]: v for v in kinds[job]["spec"]["template"]["spec"]["volumes"]}
        assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == "team-data"


def config_of(variant: str) -> Any:
    return parse_config(by_kind(build(variant)[1])["ConfigMap"]["data"]["config.yaml"])


def test_runs_sharing_an_existing_claim_keep_their_own_files_apart():
    """On a claim of the user's, several runs share one volume: each run's own relative paths go under
    runs/<run>/, the data and the model (cache) stay where they are."""
    config = config_of("existing claim")
    assert (config.checkpoints.dir, config.output.dir, config.dataset.prepared_dir) == (
        "runs/my-run/checkpoints",
        "runs/my-run/output",
        "runs/my-run/prepared",
    )
    assert (config.dataset.path, config.model.name_or_path) == ("data/chat.jsonl", "Qwen/Qwen2.5-0.5B-Instruct")
    spec = api.TrainingRunSpec.model_validate({**BASE, **VARIANTS["existing claim"]})
    assert r.output_path(RUN, spec) == "/workspace/runs/my-run/output"
    other = r.run_config(r.RunRef("other-run", "ml", "uid-2"), spec)
    assert other.checkpoints.dir == "runs/other-run/checkpoints"
    # The run's own volume is the run's alone: the paths stay as written.
    assert (config_of("defaults").checkpoints.dir, config_of("defaults").output.dir) == ("checkpoints", "output")


@pytest.mark.parametrize(
    ("overrides", "checkpoints", "output", "prepared"),
    [
        ({"output": {"dir": "/mnt/adapters/a"}}, "runs/my-run/checkpoints", "/mnt/adapters/a", "runs/my-run/prepared"),
        ({"checkpoints": {"dir": "./ckpt"}}, "runs/my-run/ckpt", "runs/my-run/output", "runs/my-run/prepared"),
        ({"dataset": {"path": "d.jsonl", "preparedDir": None}}, "runs/my-run/checkpoints", "runs/my-run/output", None),
    ],
)
def test_absolute_paths_on_an_existing_claim_are_the_users_choice(overrides, checkpoints, output, prepared):
    spec = api.TrainingRunSpec.model_validate({**BASE, "storage": {"existingClaim": "team-data"}, **overrides})
    config = r.run_config(RUN, spec)
    assert (config.checkpoints.dir, config.output.dir, config.dataset.prepared_dir) == (checkpoints, output, prepared)
    assert r.output_path(RUN, spec) == (output if output.startswith("/") else f"/workspace/{output}")


def test_the_trainer_may_patch_its_own_status_and_nothing_else():
    role = by_kind(build("defaults")[1])["Role"]
    assert role["rules"] == [
        {
            "apiGroups": ["kubetune.io"],
            "resources": ["trainingruns/status"],
            "resourceNames": ["my-run"],
            "verbs": ["get", "patch"],
        }
    ]
    binding = by_kind(build("defaults")[1])["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "my-run-trainer", "namespace": "ml"}]


def test_training_job_retries_only_what_a_retry_can_fix():
    spec, manifests = build("defaults")
    job = by_kind(manifests)["my-run-train"]["spec"]
    assert job["backoffLimit"] == spec.max_restarts
    ignore, fail = job["podFailurePolicy"]["rules"]  # the first rule a failed pod matches decides
    assert fail == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2, 3, 4, 5, 6]},
    }
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert c.EXIT_SIGTERM not in fail["onExitCodes"]["values"], "a SIGTERM exit is retried (counted)"
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert job["suspend"] is False


@pytest.mark.parametrize("code", [*sorted(c.FAILJOB_EXIT_CODES), 1, c.EXIT_SIGTERM])
def test_an_evicted_pod_is_ignored_whatever_it_exited_with(code):
    """A pod evicted (DisruptionTarget) while the trainer stops may exit 2-6; it is not the trainer's failure."""
    from tests.operator.jobrunner import _policy_action

    policy = by_kind(build("defaults")[1])["my-run-train"]["spec"]["podFailurePolicy"]
    terminated = {"name": c.CONTAINER, "state": {"terminated": {"exitCode": code}}}
    evicted = {"conditions": [{"type": "DisruptionTarget", "status": "True"}], "containerStatuses": [terminated]}
    assert _policy_action(policy, {"status": evicted})[0] == "Ignore"
    crashed = {"containerStatuses": [terminated]}
    assert _policy_action(policy, {"status": crashed})[0] == ("FailJob" if code in c.FAILJOB_EXIT_CODES else "Count")


def test_pods_run_locked_down():
    pod = by_kind(build("defaults")[1])["my-run-train"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # The volume's files get the trainer's group once, not again at every pod start (a model cache: minutes).
    assert pod["securityContext"]["fsGroup"] == c.TRAINER_UID
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    container = pod["containers"][0]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/workspace", "/etc/kubetune", "/tmp", "/dev/shm"} == mounts
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_gpus_scheduling_and_lifecycle_reach_the_job():
    _, manifests = build("everything")
    kinds = by_kind(manifests)
    train = kinds["my-run-train"]
    pod = train["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["args"] == ["run", "/etc/kubetune/config.yaml", "--expect-gpus", "4"]
    assert container["image"] == "registry.local/custom:1"
    assert container["imagePullPolicy"] == "Always"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"] == VARIANTS["everything"]["affinity"]
    assert pod["nodeSelector"] == {"pool": "training", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["priorityClassName"] == "training-high"
    assert pod["terminationGracePeriodSeconds"] == 120
    assert train["metadata"]["labels"][c.LABEL_KUEUE_QUEUE] == "gpu-queue"
    assert train["spec"]["suspend"] is True
    assert train["spec"]["activeDeadlineSeconds"] == 86400
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert env["WANDB_MODE"]["value"] == "offline"
    assert env[c.TERMINATION_ENV]["value"] == c.TERMINATION_LOG
    # The prepare pod goes where the training pod will (the volume binds in its zone), without GPUs.
    prepare = kinds["my-run-prepare"]["spec"]["template"]["spec"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert prepare[key] == pod[key], key
    assert prepare["containers"][0]["image"] == container["image"]
    assert prepare["containers"][0]["imagePullPolicy"] == "Always"
    assert "nvidia.com/gpu" not in prepare["containers"][0]["resources"]["limits"]


def test_without_scheduling_fields_the_pods_carry_none_and_the_operators_image_settings():
    for job in ("my-run-prepare", "my-run-train"):
        pod = by_kind(build("defaults")[1])[job]["spec"]["template"]["spec"]
        assert not {"tolerations", "affinity", "priorityClassName"} & set(pod), job
        container = pod["containers"][0]
        assert (container["image"], container["imagePullPolicy"]) == (SETTINGS.trainer_image, "IfNotPresent")
    settings = r.OperatorSettings(trainer_image="x:1", image_pull_policy="Always")
    spec = api.TrainingRunSpec.model_validate(BASE)
    container = r.train_job(RUN, spec, settings)["spec"]["template"]["spec"]["containers"][0]
    assert container["imagePullPolicy"] == "Always"


def test_the_default_trainer_image_is_the_releases_and_the_charts():
    """One default: the package version; the chart's trainer.image (which it hands the operator) agrees."""
    values = yaml.safe_load((crd.ROOT / "helm" / "kubetune" / "values.yaml").read_text())
    expected = f"ghcr.io/kubetune/trainer:{metadata.version('kubetune')}"
    assert r.OperatorSettings().trainer_image == expected
    assert handlers.settings_from_env({}).trainer_image == expected
    assert values["trainer"]["image"] == expected, "helm/kubetune/values.yaml trainer.image"


def test_cpu_only_runs_ask_for_no_gpu():
    container = by_kind(build("cpu only")[1])["my-run-train"]["spec"]["template"]["spec"]["containers"][0]
    assert set(container["resources"]["limits"]) == {"cpu", "memory"}
    assert container["args"][-1] == "0"


def test_the_trainer_config_is_the_training_part_of_the_spec():
    spec, manifests = build("everything")
    text = by_kind(manifests)["ConfigMap"]["data"]["config.yaml"]
    assert parse_config(text) == spec.train_config()
    assert "queueName" not in text
    assert "image" not in text


def test_no_job_gets_a_ttl_when_it_is_made():
    """A Job deleted by its TTL before the operator saw how it ended would take the outcome with it; the
    operator sets the TTL once the run's end is written (job_patch)."""
    for manifest in build("everything")[1]:
        if manifest["kind"] == "Job":
            assert "ttlSecondsAfterFinished" not in manifest["spec"], manifest["metadata"]["name"]


def job_view(component: str = c.TRAIN, finished: bool = False, **spec: Any) -> JobView:
    conditions = [{"type": "Complete", "status": "True"}] if finished else []
    return JobView.from_dict(
        {"metadata": {"name": f"my-run-{component}"}, "spec": spec, "status": {"conditions": conditions}}, []
    )


LIVE = {"backoffLimit": 3}
JOB_PATCHES = [
    # (spec overrides, Job, component, run ended, expected patch)
    ({}, job_view(**LIVE), c.TRAIN, False, None),
    ({"maxRestarts": 5}, job_view(**LIVE), c.TRAIN, False, {"spec": {"backoffLimit": 5}}),
    ({"activeDeadlineSeconds": 600}, job_view(**LIVE), c.TRAIN, False, {"spec": {"activeDeadlineSeconds": 600}}),
    ({}, job_view(**LIVE, activeDeadlineSeconds=600), c.TRAIN, False, {"spec": {"activeDeadlineSeconds": None}}),
    ({"ttlSecondsAfterFinished": 60}, job_view(**LIVE), c.TRAIN, False, None),  # not before the run ends
    (
        {"ttlSecondsAfterFinished": 60},
        job_view(finished=True, **LIVE),
        c.TRAIN,
        True,
        {"spec": {"ttlSecondsAfterFinished": 60}},
    ),
    (
        {"ttlSecondsAfterFinished": 60},
        job_view(c.PREPARE, finished=True),
        c.PREPARE,
        True,
        {"spec": {"ttlSecondsAfterFinished": 60}},
    ),
    (
        {},
        job_view(finished=True, ttlSecondsAfterFinished=60, **LIVE),
        c.TRAIN,
        True,
        {"spec": {"ttlSecondsAfterFinished": None}},
    ),
    ({"maxRestarts": 9}, job_view(finished=True, **LIVE), c.TRAIN, True, None),  # a finished Job keeps its limits
    ({"maxRestarts": 9}, job_view(c.PREPARE, backoffLimit=2), c.PREPARE, False, None),  # prepare's are the operator's
]


@pytest.mark.parametrize(("overrides", "job", "component", "ended", "expected"), JOB_PATCHES)
def test_the_mutable_fields_reach_existing_jobs(overrides, job, component, ended, expected):
    spec = api.TrainingRunSpec.model_validate({**BASE, **overrides})
    assert r.job_patch(job, spec, component, run_ended=ended) == expected


def test_job_patch_changes_only_what_a_job_may_change():
    """The API server refuses changes to a Job's template, podFailurePolicy, completions, selector."""
    spec = api.TrainingRunSpec.model_validate({**BASE, "maxRestarts": 1, "activeDeadlineSeconds": 5})
    patch = r.job_patch(job_view(), spec, c.TRAIN, run_ended=False)
    assert set(patch["spec"]) <= {"backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "suspend"}
