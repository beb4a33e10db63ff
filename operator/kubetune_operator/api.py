"""The TrainingRun API: the one source of the CRD schema and of the operator's own validation.

`TrainingRunSpec` is the trainer's `TrainConfig` plus the Kubernetes fields, so the
training part of a TrainingRun is exactly a local config file. `crd.py` renders the
CRD from these models: descriptions, defaults, enums and the CEL rules declared here
(`cel_rules`) all come from this module.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from kubetune_trainer import contract
from kubetune_trainer.config import ReportingConfig, Section, TrainConfig

GROUP = contract.API_GROUP
VERSION = contract.API_VERSION
KIND = "TrainingRun"
PLURAL = contract.API_PLURAL
SINGULAR = "trainingrun"
SHORT_NAMES = ("tr",)
CATEGORIES = ("kubetune",)
API_VERSION = f"{GROUP}/{VERSION}"

# A Kubernetes resource quantity: 4, "500m", "32Gi". Rendered as int-or-string like the core API.
_QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


def _quantity(value: Any) -> Any:
    """The CRD's pattern, checked here too: an old CRD lets a bad value through to a 422 on the Job."""
    ok = isinstance(value, str) and re.fullmatch(_QUANTITY, value) and not value.startswith("-")
    if not ok and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"must be a Kubernetes quantity such as 4, 500m or 32Gi, not {value!r}")
    return value


Quantity = Annotated[
    int | str,
    Field(union_mode="left_to_right"),
    BeforeValidator(_quantity),
    WithJsonSchema(
        {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": _QUANTITY}
    ),
]
# A free-form object checked by the API server where it is used (affinity).
FreeForm = Annotated[dict[str, Any], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})]


class ResourcesSpec(Section):
    gpu: int = Field(1, ge=0, description="GPUs for the training pod; 0 trains on CPU.")
    gpu_resource: str = Field(
        "nvidia.com/gpu", min_length=1, description="Extended resource name of the GPU, e.g. amd.com/gpu."
    )
    gpu_type: str | None = Field(
        None,
        description="Required value of the node label gpuTypeLabel, e.g. NVIDIA-H100-80GB-HBM3; any GPU when unset.",
    )
    gpu_type_label: str = Field(
        "nvidia.com/gpu.product", description="Node label that carries the GPU type (NVIDIA GPU feature discovery)."
    )
    cpu: Quantity = Field("4", description="CPU request and limit of the training pod.")
    memory: Quantity = Field("32Gi", description="Memory request and limit of the training pod.")
    prepare_cpu: Quantity = Field("2", description="CPU request and limit of the prepare pod (no GPU).")
    prepare_memory: Quantity = Field("8Gi", description="Memory request and limit of the prepare pod.")


class StorageSpec(Section):
    size: Quantity = Field("50Gi", description="Size of the run's volume (cache, data, checkpoints, output).")
    storage_class_name: str | None = Field(
        None, description="Storage class of the volume; the cluster default when unset."
    )
    existing_claim: str | None = Field(
        None, description="Use this PersistentVolumeClaim (e.g. one holding the data) instead of creating one."
    )
    delete_with_run: bool = Field(
        False,
        description="Delete the created volume, and the adapter on it, when the TrainingRun is deleted. By default "
        "it is kept.",
    )


class KeySelector(Section):
    name: str = Field(min_length=1, max_length=253, description="Name of the Secret or ConfigMap.")
    key: str = Field(min_length=1, max_length=253, description="Key within it.")


class EnvVarSource(Section):
    secret_key_ref: KeySelector | None = Field(None, description="A key of a Secret in the run's namespace.")
    config_map_key_ref: KeySelector | None = Field(None, description="A key of a ConfigMap in the run's namespace.")

    cel_rules = (
        ("has(self.secretKeyRef) != has(self.configMapKeyRef)", "set exactly one of secretKeyRef and configMapKeyRef"),
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvVarSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("set exactly one of secretKeyRef and configMapKeyRef")
        return self


class EnvVar(Section):
    name: str = Field(
        min_length=1, max_length=253, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", description="Variable name."
    )
    value: str | None = Field(None, max_length=32768, description="Literal value.")
    value_from: EnvVarSource | None = Field(None, description="Take the value from a Secret or ConfigMap key.")

    cel_rules = (("has(self.value) != has(self.valueFrom)", "set exactly one of value and valueFrom"),)

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvVar:
        if (self.value is None) == (self.value_from is None):
            raise ValueError("set exactly one of value and valueFrom")
        return self


class Toleration(Section):
    key: str | None = Field(
        None, max_length=317, description="Taint key; all taints when unset and operator is Exists."
    )
    operator: Literal["Exists", "Equal"] = Field("Equal", description="How key and value are compared.")
    value: str | None = Field(None, max_length=63, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; all when unset."
    )
    toleration_seconds: int | None = Field(None, description="For NoExecute: how long the pod stays bound.")

    # The Kubernetes API refuses pods that break these (a 422 on the Job), so they are checked up front.
    cel_rules = (
        (
            "self.operator == 'Exists' || (has(self.key) && size(self.key) > 0)",
            "a toleration needs a key unless its operator is Exists",
        ),
        (
            "self.operator != 'Exists' || !has(self.value) || size(self.value) == 0",
            "a toleration with operator Exists takes no value",
        ),
        (
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "tolerationSeconds needs effect NoExecute",
        ),
    )

    @model_validator(mode="after")
    def _kubernetes_rules(self) -> Toleration:
        if self.operator != "Exists" and not self.key:
            raise ValueError("a toleration needs a key unless its operator is Exists")
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists takes no value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


class ClusterReporting(ReportingConfig):
    metrics_port: int | None = Field(
        9400,
        ge=1,
        le=65535,
        description="Port of the trainer pod's Prometheus metrics (scraped by the chart's PodMonitor); null turns "
        "them off.",
    )


# Spec fields that may change while a run exists; everything else is fixed at creation,
# because the ConfigMap, volume and Jobs were made from it.
MUTABLE_FIELDS = ("suspend", "maxRestarts", "activeDeadlineSeconds", "ttlSecondsAfterFinished")


class TrainingRunSpec(TrainConfig):
    """What to train (the trainer's config) and how to run it on Kubernetes."""

    reporting: ClusterReporting = Field(
        default_factory=ClusterReporting,
        description="Where progress goes: the run's status (always) and the pod's Prometheus metrics.",
    )
    image: str | None = Field(
        None,
        max_length=1024,
        description="Trainer image; the operator's default (Helm value trainer.image) when unset.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Image pull policy of the trainer containers; the Kubernetes default when unset."
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Compute for the pods.")
    # Bounds keep the API server's estimate of the CEL rules' cost (self == oldSelf, per-item rules) small.
    node_selector: dict[str, str] = Field({}, max_length=64, description="Node labels the training pod requires.")
    tolerations: list[Toleration] = Field([], max_length=64, description="Taints the pods tolerate.")
    affinity: FreeForm | None = Field(None, description="Pod affinity, as in a PodSpec.")
    priority_class_name: str | None = Field(
        None, max_length=253, description="PriorityClass of the pods (it must exist)."
    )
    storage: StorageSpec = Field(default_factory=StorageSpec, description="The run's volume, mounted at /workspace.")
    env: list[EnvVar] = Field([], max_length=128, description="Extra environment variables for the trainer.")
    hf_token_secret: KeySelector | None = Field(
        None, description="Secret key with a Hugging Face token, passed as HF_TOKEN (for gated models)."
    )
    suspend: bool = Field(
        False,
        description="Suspend the run: the trainer saves a checkpoint and stops; false resumes from it. With "
        "queueName the training Job is deleted instead (Kueue starts any admitted Job that is suspended) and made "
        "again on resume, for Kueue to admit.",
    )
    queue_name: str | None = Field(
        None,
        max_length=63,
        description="Kueue LocalQueue. The training Job is created suspended with the kueue.x-k8s.io/queue-name "
        "label and starts when Kueue admits it.",
    )
    max_restarts: int = Field(
        3,
        ge=0,
        description="Failed training pods retried before the run fails (the Job's backoffLimit). Evictions and "
        "preemptions do not count. May change on a run: a running Job takes the new value, and raising it on a "
        "run that failed with BackoffLimitExceeded retries it from its newest checkpoint (a new training Job, "
        "with this many restarts again).",
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        description="Fail the run once its training Job has been running this long (counted again after a "
        "suspension or a retry). May change on a run: a running Job takes the new value, and raising or removing "
        "it on a run that failed with DeadlineExceeded retries it from its newest checkpoint.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        description="Delete the run's Jobs (not the run or its volume) this many seconds after they finished. The "
        "operator sets it on the Jobs once the run has succeeded or failed, never before.",
    )
    termination_grace_period_seconds: int = Field(
        60,
        ge=10,
        description="Seconds between SIGTERM and SIGKILL for the trainer pods; checkpoints.graceSeconds must be "
        "below it so the trainer exits on its own after saving.",
    )

    cel_rules = (
        *TrainConfig.cel_rules,
        (
            "self.checkpoints.graceSeconds < double(self.terminationGracePeriodSeconds)",
            "checkpoints.graceSeconds must be below terminationGracePeriodSeconds",
        ),
        (
            "!has(self.storage.existingClaim) || !self.storage.deleteWithRun",
            "storage.deleteWithRun applies only to a volume the operator creates, not to existingClaim",
        ),
    )

    @model_validator(mode="after")
    def _kubernetes_rules(self) -> TrainingRunSpec:
        if self.checkpoints.grace_seconds >= self.termination_grace_period_seconds:
            raise ValueError("checkpoints.graceSeconds must be below terminationGracePeriodSeconds")
        if self.storage.existing_claim is not None and self.storage.delete_with_run:
            raise ValueError(
                "storage.deleteWithRun applies only to a volume the operator creates, not to existingClaim"
            )
        return self

    def train_config(self) -> TrainConfig:
        """The trainer's part of the spec, as the file the trainer pods read."""
        return TrainConfig.model_validate(self.model_dump(include=set(TrainConfig.model_fields), by_alias=True))


class Condition(Section):
    type: str = Field(
        description="Initialized, Admitted (runs with a queueName: Kueue admitted the training Job), Running, "
        "Suspended, Succeeded or Failed."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="Whether the condition holds.")
    reason: str = Field(description="Machine-readable reason, CamelCase.")
    message: str = Field("", description="What happened, for people.")
    last_transition_time: str = Field(description="When the status last changed.")
    observed_generation: int | None = Field(None, description="The spec generation this was computed from.")


# The phases, in lifecycle order: the status schema's enum; constants.PHASES (PENDING, ...) are read from here.
Phase = Literal["Pending", "Initializing", "Queued", "Running", "Suspended", "Succeeded", "Failed"]


class OutputStatus(Section):
    volume: str = Field(description="PersistentVolumeClaim holding the run's files.")
    path: str = Field(description="Directory of the adapter on that volume.")


class TrainingRunStatus(Section):
    """Two writers, disjoint fields: the operator writes the first group, the trainer the second."""

    model_config = ConfigDict(extra="allow")  # a newer trainer may report fields this operator does not know

    phase: Phase | None = Field(None, description="Where the run is in its life.")
    reason: str | None = Field(None, description="Why it is in that phase, CamelCase (e.g. Unschedulable, Diverged).")
    message: str | None = Field(None, description="What happened and, for a failure, what to change.")
    conditions: list[Condition] = Field(
        [],
        description="Detailed state, one entry per type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(None, description="The spec generation the operator last acted on.")
    job_name: str | None = Field(None, description="The training Job.")
    restarts: int = Field(
        0, description="Training pods that failed or were evicted and were replaced (a final failure is not)."
    )
    start_time: str | None = Field(None, description="When training started (the training Job's startTime).")
    completion_time: str | None = Field(
        None, description="When the run succeeded or failed (the Job's completion or failure time)."
    )
    output: OutputStatus | None = Field(None, description="Where the exported adapter is.")

    progress: FreeForm | None = Field(None, description="Written by the trainer: step, loss, throughput, ETA.")
    checkpoint: FreeForm | None = Field(None, description="Written by the trainer: latest and best checkpoint.")
    preflight: FreeForm | None = Field(None, description="Written by the trainer: the preflight report.")
    evaluation: FreeForm | None = Field(None, description="Written by the trainer: evaluation results.")

    OPERATOR_FIELDS: ClassVar[tuple[str, ...]] = (
        "phase",
        "reason",
        "message",
        "conditions",
        "observedGeneration",
        "jobName",
        "restarts",
        "startTime",
        "completionTime",
        "output",
    )
    TRAINER_FIELDS: ClassVar[tuple[str, ...]] = ("progress", "checkpoint", "preflight", "evaluation")
