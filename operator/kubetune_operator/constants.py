"""Every name, label, path, reason and exit code the operator and its children share, once."""

from __future__ import annotations

import signal
from importlib import metadata
from typing import get_args

from kubetune_operator import api
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
# On the volume the operator creates: the uid of the run that created it. The volume outlives its run (unless
# storage.deleteWithRun), so a run applied again under the same name finds it, and can tell it is not its own.
ANNOTATION_RUN_UID = f"{ANNOTATION_PREFIX}/run-uid"

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
# The trainer image of runs without spec.image, unless the operator's KUBETUNE_TRAINER_IMAGE (the chart's
# trainer.image) says otherwise: the release's own version, so operator and trainer match by default.
TRAINER_IMAGE = f"ghcr.io/kubetune/trainer:{metadata.version('kubetune')}"
# With storage.existingClaim the volume is shared: a run's own relative output paths go under runs/<run>/.
RUNS_DIR = "runs"

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

# Phases of a TrainingRun (status.phase): the values of api.Phase, the schema's enum, in lifecycle order.
PHASES: tuple[str, ...] = get_args(api.Phase)
PENDING, INITIALIZING, QUEUED, RUNNING, SUSPENDED, SUCCEEDED, FAILED = PHASES
TERMINAL = (SUCCEEDED, FAILED)
# Condition types of a TrainingRun (status.conditions), in the order they are listed.
CONDITION_INITIALIZED, CONDITION_ADMITTED = "Initialized", "Admitted"  # Admitted: runs with a queueName only
CONDITION_RUNNING, CONDITION_SUSPENDED, CONDITION_SUCCEEDED, CONDITION_FAILED = (
    "Running",
    "Suspended",
    "Succeeded",
    "Failed",
)
CONDITION_TYPES = (
    CONDITION_INITIALIZED,
    CONDITION_ADMITTED,
    CONDITION_RUNNING,
    CONDITION_SUSPENDED,
    CONDITION_SUCCEEDED,
    CONDITION_FAILED,
)
# Reasons (status.reason, and the reason of the Event posted when it changes).
REASON_CREATING = "Creating"  # the base children are being made
REASON_PREPARING = "Preparing"
REASON_PREPARED = "Prepared"  # also the Initialized condition's reason once it is True
REASON_STARTING = "Starting"
REASON_TRAINING = "Training"
REASON_RESTARTING = "Restarting"
REASON_SUSPENDING = "Suspending"  # suspended, its trainer still saving a checkpoint
REASON_SUSPENDED = "Suspended"
REASON_COMPLETED = "Completed"
REASON_INVALID_SPEC = trainer_errors.ConfigError.reason
REASON_VOLUME_FULL = trainer_errors.StorageFullError.reason
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
REASON_OLD_PODS = "WaitingForOldPods"  # a replaced training Job's pod still runs on the run's volume
REASON_QUOTA = "QuotaExceeded"  # a ResourceQuota keeps a Job, or a Job's pod, from being created
REASON_POD_CREATE_FAILED = "PodCreateFailed"  # the Job controller cannot create the pod (see its FailedCreate Events)
REASON_RETRYING = "Retrying"
REASON_VOLUME_OF_EARLIER_RUN = "VolumeOfEarlierRun"  # the run's volume was kept from an earlier run of its name
# The trainer refuses checkpoints or an adapter of another run on the volume: exit code 2, as any ConfigError,
# told apart by this reason in its termination message ({"reason", "message"}).
REASON_VOLUME_HOLDS_OTHER_RUN = trainer_errors.OtherRunError.reason
# The messages of the lifecycle's reasons ({fields} are filled in where they are used). A failure's message is
# composed in status.py from what was observed: the trainer's words, the limit it hit, the setting to change.
MESSAGE_CREATING = "Creating the run's volume, config and prepare Job."
MESSAGE_PREPARING = "Fetching the model and checking and tokenizing the data."
MESSAGE_PREPARED = "Data and model are ready; creating the training Job."
MESSAGE_INITIALIZED = "Model and data are ready."  # the Initialized condition's, once True
MESSAGE_RESTARTING_JOB = "Creating the training Job; it resumes from the newest checkpoint."
MESSAGE_POD_CREATING = "Waiting for the training pod to be created."
MESSAGE_POD_STARTING = "The training pod is starting."
MESSAGE_TRAINING = "Training."
MESSAGE_TRAINING_AGAIN = "Training (attempt {attempt})."
MESSAGE_RESTARTING = "The training pod {why}; starting another that resumes from the newest checkpoint."
MESSAGE_SUSPENDING = "The trainer is saving a checkpoint before it stops."
MESSAGE_SUSPENDED = "Suspended with its checkpoint saved; set spec.suspend: false to resume."
MESSAGE_SUSPENDED_BEFORE_TRAINING = "Suspended before training started; set spec.suspend: false."
MESSAGE_SUSPENDED_BEFORE_START = "Suspended before it started: nothing is created until spec.suspend is false."
MESSAGE_SUSPENDING_PREPARE = "The prepare pod is stopping."
MESSAGE_SUSPENDED_PREPARING = (
    "Suspended while preparing; set spec.suspend: false to resume (preparing starts again, reusing what it has "
    "fetched to the volume)."
)
MESSAGE_KUEUE = "Waiting for Kueue to admit the training Job in queue {queue}."
MESSAGE_ADMITTED = "Kueue admitted the training Job."  # the Admitted condition's
MESSAGE_NOT_ADMITTED = "The training Job waits for Kueue, or does not exist now."
MESSAGE_OLD_PODS = (
    "Waiting for pod {pods}, left from an earlier Job of this run, to stop before the training Job is created: "
    "two trainers must not share the run's volume. It stops once it has saved its checkpoint (within "
    "spec.terminationGracePeriodSeconds)."
)
MESSAGE_COMPLETED = "Training finished; the adapter is on volume {volume} in {path}."
MESSAGE_INVALID = "{problem} Fix it in a new TrainingRun (the spec is fixed)."
# Only api.MUTABLE_FIELDS may change on a run: advice to change any other field says how to get a new run.
NEW_RUN = "a new TrainingRun (delete this one and apply it again, or apply it under another name)"
MESSAGE_FIXED_SPEC = f"This run stays failed, and its spec is fixed: make the change in {NEW_RUN}."
MESSAGE_VOLUME_OF_EARLIER_RUN = (
    "Volume {volume} existed before this run (an earlier TrainingRun named {run} kept it); this run uses the files "
    "on it. With the same model, LoRA, data and batching it resumes from their checkpoints (or exports their "
    "adapter again); with other ones the trainer refuses them and the run fails. To start afresh, delete this run and "
    "PersistentVolumeClaim {volume} before applying it again, or apply it under another name."
)
MESSAGE_INVALID_WHILE_RUNNING = (
    "{problem} The run is stopped (its Jobs suspended, its checkpoints kept). This can be undone: restore a valid "
    "spec and it resumes from its newest checkpoint."
)
# Waiting phases that need someone to act: posted as Warning Events (as every Failed is).
WARNING_REASONS = (
    REASON_UNSCHEDULABLE,
    REASON_IMAGE_PULL,
    REASON_CONTAINER_CONFIG,
    REASON_BLOCKED,
    REASON_QUOTA,
    REASON_POD_CREATE_FAILED,
)
# An image that has not pulled this long after the pod was scheduled fails the run (time spent waiting
# for a node does not count: the pull starts on the node).
IMAGE_PULL_GRACE_SECONDS = 300
# A Job without a live pod this long after it was created or resumed: the operator reads the Job's FailedCreate
# Events (a full ResourceQuota, a missing PriorityClass, an admission denial) to say why. Only then: the common
# case costs no request. KUBETUNE_POD_CREATE_GRACE_SECONDS overrides it.
POD_CREATE_GRACE_SECONDS = 20.0
EVENT_FAILED_CREATE = "FailedCreate"
# The API server's words when a ResourceQuota refuses an object (a 403): a wait for room, not a refusal for good.
QUOTA_EXCEEDED = "exceeded quota"
# Kubelet waiting reasons of a container whose Secret/ConfigMap (env, hfTokenSecret) is missing.
CONTAINER_CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError")
