"""Every name, label, path, reason and exit code the operator and its children share, once."""

from __future__ import annotations

import signal

from kubetune_trainer import contract
from kubetune_trainer import errors as trainer_errors

# Labels on every child. LABEL_RUN selects a run's children.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_RUN = "kubetune.io/run"
NAME = "kubetune"
MANAGED_BY = "kubetune-operator"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_PREFIX = "kubetune.io"  # kopf's own bookkeeping annotations go under it

# Components, and the suffix of each child's name.
PREPARE, TRAIN, CONFIG, TRAINER_IDENTITY, WORKSPACE_VOLUME = "prepare", "train", "config", "trainer", "workspace"
MAX_RUN_NAME = 52  # the longest child name, "<run>-workspace", must stay within 63 characters

# Inside the trainer pods.
CONTAINER = "trainer"
WORKSPACE = "/workspace"  # the run's volume; the trainer's working directory, so relative paths land here
CONFIG_DIR = "/etc/kubetune"
CONFIG_FILE = "config.yaml"
HF_HOME = f"{WORKSPACE}/cache"
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_ENV = contract.TERMINATION_LOG_ENV
RUN_NAME_ENV = contract.RUN_NAME_ENV
RUN_NAMESPACE_ENV = contract.RUN_NAMESPACE_ENV
TRAINER_UID = 1000  # the trainer image's user

# Exit codes of kubetune-train (ARCHITECTURE.md contract 3) and what they mean for a run.
# A code listed here ends the Job at once (podFailurePolicy FailJob); others are retried.
FAILJOB_EXIT_CODES = {
    trainer_errors.ConfigError.exit_code: trainer_errors.ConfigError.reason,
    trainer_errors.PreflightError.exit_code: trainer_errors.PreflightError.reason,
    trainer_errors.DivergedError.exit_code: trainer_errors.DivergedError.reason,
    trainer_errors.StorageFullError.exit_code: trainer_errors.StorageFullError.reason,
    trainer_errors.OutOfMemoryError.exit_code: trainer_errors.OutOfMemoryError.reason,
}
EXIT_SIGTERM = trainer_errors.SIGNAL_EXIT_CODES[signal.SIGTERM]

# Phases and reasons of a TrainingRun (status.phase / status.reason).
PENDING, INITIALIZING, QUEUED, RUNNING, SUSPENDED, SUCCEEDED, FAILED = (
    "Pending",
    "Initializing",
    "Queued",
    "Running",
    "Suspended",
    "Succeeded",
    "Failed",
)
TERMINAL = (SUCCEEDED, FAILED)
REASON_INVALID_SPEC = trainer_errors.ConfigError.reason
REASON_UNSCHEDULABLE = "Unschedulable"
REASON_IMAGE_PULL = "ImagePullFailed"
REASON_OOM = "OutOfMemory"
REASON_BACKOFF = "BackoffLimitExceeded"
REASON_DEADLINE = "DeadlineExceeded"
REASON_KUEUE = "WaitingForAdmission"
REASON_ADMITTED = "Admitted"
REASON_CONTAINER_CONFIG = "ContainerConfigError"  # a Secret or ConfigMap the pod needs is missing
REASON_CREATE_FAILED = "CreateFailed"  # the API server refused a child (400/403/422)
REASON_BLOCKED = "WaitingForOldChildren"  # a child's name is held by another owner (a deleted run's)
REASON_QUOTA = "QuotaExceeded"
REASON_RETRYING = "Retrying"
# Waiting phases that need someone to act: posted as Warning Events (as every Failed is).
WARNING_REASONS = (REASON_UNSCHEDULABLE, REASON_IMAGE_PULL, REASON_CONTAINER_CONFIG, REASON_BLOCKED, REASON_QUOTA)
IMAGE_PULL_GRACE_SECONDS = 300  # an image that has not pulled in this long fails the run
# Kubelet waiting reasons of a container whose Secret/ConfigMap (env, hfTokenSecret) is missing.
CONTAINER_CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError")
