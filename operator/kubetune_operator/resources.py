"""Pure builders: a TrainingRun's spec in, the manifests of its children out.

Names are fixed (`<run>-<component>`), so building twice gives the same objects and
creating one that exists is a no-op. Every child but the volume is owned by the run
and goes when it goes; the volume holds the adapter and stays unless
spec.storage.deleteWithRun. `job_patch` says how an existing Job must change when the
run's mutable fields do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from kubetune_operator import api
from kubetune_operator import constants as c
from kubetune_operator.status import JobView
from kubetune_trainer.config import TrainConfig


@dataclass(frozen=True)
class RunRef:
    """The identity of a TrainingRun, as its children's ownerReferences need it."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class OperatorSettings:
    """Operator-wide defaults (from the Helm values, through the Deployment's environment)."""

    trainer_image: str = c.TRAINER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    prepare_backoff_limit: int = 2
    shm_size: str = "8Gi"
    extra_labels: dict[str, str] = field(default_factory=dict)
    pod_create_grace_seconds: float = c.POD_CREATE_GRACE_SECONDS


def child_name(run: str, component: str) -> str:
    return f"{run}-{component}"


def labels(run: RunRef, component: str, settings: OperatorSettings) -> dict[str, str]:
    return {
        **settings.extra_labels,
        c.LABEL_NAME: c.NAME,
        c.LABEL_INSTANCE: run.name,
        c.LABEL_COMPONENT: component,
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        c.LABEL_RUN: run.name,
    }


def _metadata(run: RunRef, component: str, settings: OperatorSettings, owned: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": child_name(run.name, component),
        "namespace": run.namespace,
        "labels": labels(run, component, settings),
    }
    if owned:
        meta["ownerReferences"] = [run.owner_reference()]
    return meta


def volume_claim_name(run: RunRef, spec: api.TrainingRunSpec) -> str:
    return spec.storage.existing_claim or child_name(run.name, c.WORKSPACE_VOLUME)


def workspace_claim(run: RunRef, spec: api.TrainingRunSpec, settings: OperatorSettings) -> dict[str, Any] | None:
    """The run's volume, or None when spec.storage.existingClaim names one."""
    if spec.storage.existing_claim:
        return None
    meta = _metadata(run, c.WORKSPACE_VOLUME, settings, owned=spec.storage.delete_with_run)
    meta["annotations"] = {c.ANNOTATION_RUN_UID: run.uid}  # a later run of the same name can tell it is not its own
    claim: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": meta,
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": str(spec.storage.size)}},
        },
    }
    if spec.storage.storage_class_name:
        claim["spec"]["storageClassName"] = spec.storage.storage_class_name
    return claim


def run_config(run: RunRef, spec: api.TrainingRunSpec) -> TrainConfig:
    """The TrainConfig part of the spec as this run's trainer reads it.

    A volume of the user's (storage.existingClaim) may serve several runs: each run's own relative paths
    (checkpoints.dir, output.dir, dataset.preparedDir; the preflight report, progress and evaluation files
    live in output.dir) go under runs/<run>/ there, so runs do not resume from, or export over, each other's
    files. The data, the model and the model cache (HF_HOME) stay shared; an absolute path is the user's
    explicit choice and stays too."""
    config = spec.train_config()
    if not spec.storage.existing_claim:
        return config

    def own(path: str) -> str:
        return run_path(run, spec, path)

    prepared_dir = config.dataset.prepared_dir
    return config.model_copy(
        update={
            "checkpoints": config.checkpoints.model_copy(update={"dir": own(config.checkpoints.dir)}),
            "output": config.output.model_copy(update={"dir": own(config.output.dir)}),
            "dataset": config.dataset.model_copy(update={"prepared_dir": prepared_dir and own(prepared_dir)}),
        }
    )


def run_path(run: RunRef, spec: api.TrainingRunSpec, path: str) -> str:
    """A path of the run's config as its trainer sees it: relative ones under runs/<run>/ on a shared claim."""
    if not spec.storage.existing_claim or PurePosixPath(path).is_absolute():
        return path
    return str(PurePosixPath(c.RUNS_DIR, run.name, path))


def output_path(run: RunRef, spec: api.TrainingRunSpec) -> str:
    """Where the adapter lands, as an absolute path in the trainer pods (status.output.path). Every reconcile
    asks, so it reads output.dir from the spec rather than building the whole trainer config."""
    out = PurePosixPath(run_path(run, spec, spec.output.dir))
    return str(out if out.is_absolute() else PurePosixPath(c.WORKSPACE) / out)


def trainer_config(run: RunRef, spec: api.TrainingRunSpec, settings: OperatorSettings) -> dict[str, Any]:
    """The trainer's config file: the TrainConfig part of the spec, as a local run would read it."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, c.CONFIG, settings),
        "data": {c.CONFIG_FILE: run_config(run, spec).to_yaml()},
    }


def trainer_identity(run: RunRef, settings: OperatorSettings) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding: the trainer may read and patch its own run's status, nothing else."""
    meta = _metadata(run, c.TRAINER_IDENTITY, settings)
    name = meta["name"]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [
                {
                    "apiGroups": [api.GROUP],
                    "resources": [f"{api.PLURAL}/status"],
                    "resourceNames": [run.name],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": run.namespace}],
        },
    ]


def _env(run: RunRef, spec: api.TrainingRunSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": c.HF_HOME},
        {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only; libraries cache under $HOME
        {"name": c.TERMINATION_ENV, "value": c.TERMINATION_LOG},
        {"name": c.RUN_NAME_ENV, "value": run.name},
        {"name": c.RUN_NAMESPACE_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if spec.hf_token_secret:
        ref = spec.hf_token_secret
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    for var in spec.env:
        env.append(var.model_dump(by_alias=True, exclude_none=True))
    return env


def _pod_template(
    run: RunRef,
    spec: api.TrainingRunSpec,
    settings: OperatorSettings,
    component: str,
    args: list[str],
    resources: dict[str, Any],
    scheduling: dict[str, Any],
) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the Job decides on retries, through its podFailurePolicy
        "serviceAccountName": child_name(run.name, c.TRAINER_IDENTITY),
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": c.TRAINER_UID,
            "runAsGroup": c.TRAINER_UID,
            "fsGroup": c.TRAINER_UID,
            # Without it the kubelet changes the owner of every file on the volume at each pod start: minutes for
            # a model cache and many checkpoints. The volume's root tells whether that was done.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": c.CONTAINER,
                "image": spec.image or settings.trainer_image,
                "imagePullPolicy": spec.image_pull_policy or settings.image_pull_policy,
                "command": ["kubetune-train"],
                "args": args,
                "workingDir": c.WORKSPACE,
                "env": _env(run, spec),
                "resources": resources,
                **(
                    {"ports": [{"name": "metrics", "containerPort": spec.reporting.metrics_port, "protocol": "TCP"}]}
                    if spec.reporting.metrics_port and component == c.TRAIN  # prepare serves no metrics
                    else {}
                ),
                "terminationMessagePath": c.TERMINATION_LOG,
                # A crash that writes no message leaves its last log lines (the traceback) instead.
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                    "readOnlyRootFilesystem": True,
                },
                "volumeMounts": [
                    {"name": "workspace", "mountPath": c.WORKSPACE},
                    {"name": "config", "mountPath": c.CONFIG_DIR, "readOnly": True},
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "shm", "mountPath": "/dev/shm"},  # dataloader workers share tensors here
                ],
            }
        ],
        "volumes": [
            {"name": "workspace", "persistentVolumeClaim": {"claimName": volume_claim_name(run, spec)}},
            {"name": "config", "configMap": {"name": child_name(run.name, c.CONFIG)}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
        ],
        **scheduling,
    }
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    return {"metadata": {"labels": labels(run, component, settings)}, "spec": pod_spec}


def _pod_failure_policy() -> dict[str, Any]:
    return {
        # The first rule a failed pod matches decides.
        "rules": [
            # Evictions, preemptions and node drains are not the trainer's failures, whatever code it exited with
            # while it stopped: this rule comes first.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            # Retrying cannot fix a bad config, a failed preflight, divergence, a full volume or GPU OOM.
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": c.CONTAINER, "operator": "In", "values": sorted(c.FAILJOB_EXIT_CODES)},
            },
        ]
    }


def _scheduling(spec: api.TrainingRunSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    selector = dict(spec.node_selector)
    if spec.resources.gpu_type:
        selector[spec.resources.gpu_type_label] = spec.resources.gpu_type
    if selector:
        out["nodeSelector"] = selector
    if spec.tolerations:
        out["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]
    if spec.affinity:
        out["affinity"] = spec.affinity
    if spec.priority_class_name:
        out["priorityClassName"] = spec.priority_class_name
    return out


def _compute(cpu: Any, memory: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    amounts = {"cpu": str(cpu), "memory": str(memory), **(extra or {})}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def prepare_job(run: RunRef, spec: api.TrainingRunSpec, settings: OperatorSettings) -> dict[str, Any]:
    """The CPU half: fetch the model, check and tokenize the data onto the volume."""
    args = ["prepare", f"{c.CONFIG_DIR}/{c.CONFIG_FILE}"]
    resources = _compute(spec.resources.prepare_cpu, spec.resources.prepare_memory)
    # Scheduled where the training pod will be (without its GPUs): a ReadWriteOnce volume binds in the
    # zone of its first pod, and the GPU pod must be able to follow it there.
    scheduling = _scheduling(spec)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(run, c.PREPARE, settings),
        "spec": {
            "backoffLimit": settings.prepare_backoff_limit,
            "podFailurePolicy": _pod_failure_policy(),
            # No ttlSecondsAfterFinished: the operator sets it once the run has ended (job_patch).
            "template": _pod_template(run, spec, settings, c.PREPARE, args, resources, scheduling),
        },
    }


def train_job(run: RunRef, spec: api.TrainingRunSpec, settings: OperatorSettings) -> dict[str, Any]:
    """The GPU half: preflight, train, evaluate, export; resumes from the volume's checkpoints."""
    gpus = spec.resources.gpu
    args = ["run", f"{c.CONFIG_DIR}/{c.CONFIG_FILE}", "--expect-gpus", str(gpus)]
    resources = _compute(
        spec.resources.cpu, spec.resources.memory, {spec.resources.gpu_resource: str(gpus)} if gpus else None
    )
    meta = _metadata(run, c.TRAIN, settings)
    if spec.queue_name:
        meta["labels"][c.LABEL_KUEUE_QUEUE] = spec.queue_name
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.max_restarts,
        "podFailurePolicy": _pod_failure_policy(),
        # Kueue admits a queued Job by unsuspending it. (A suspended run gets no training Job at all.)
        "suspend": spec.suspend or bool(spec.queue_name),
        "template": _pod_template(run, spec, settings, c.TRAIN, args, resources, _scheduling(spec)),
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    # No ttlSecondsAfterFinished yet: a Job deleted before the operator saw how it ended would lose the
    # outcome (and a deleted prepare Job looked like a run still to prepare). job_patch adds it at the end.
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def job_patch(job: JobView, spec: api.TrainingRunSpec, component: str, run_ended: bool) -> dict[str, Any] | None:
    """The merge patch that brings an existing Job's mutable fields to the spec, or None.

    Of the fields a TrainingRun may change, a Job may change backoffLimit, activeDeadlineSeconds and
    ttlSecondsAfterFinished (the API server keeps template, podFailurePolicy and completions fixed).
    The limits matter only while the Job runs; the TTL is set once the run has ended.
    """
    want: dict[str, Any] = {}
    if component == c.TRAIN and not job.finished:
        want["backoffLimit"] = spec.max_restarts
        want["activeDeadlineSeconds"] = spec.active_deadline_seconds  # None removes it
    if run_ended:
        want["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    have = {
        "backoffLimit": job.backoff_limit,
        "activeDeadlineSeconds": job.active_deadline_seconds,
        "ttlSecondsAfterFinished": job.ttl_seconds_after_finished,
    }
    changed = {k: v for k, v in want.items() if have[k] != v}
    return {"spec": changed} if changed else None


def base_children(run: RunRef, spec: api.TrainingRunSpec, settings: OperatorSettings) -> list[dict[str, Any]]:
    """What every run gets at once: volume, config, identity and the prepare Job (in creation order)."""
    claim = workspace_claim(run, spec, settings)
    return [
        *([claim] if claim else []),
        trainer_config(run, spec, settings),
        *trainer_identity(run, settings),
        prepare_job(run, spec, settings),
    ]
