"""Names the trainer and the operator share (ARCHITECTURE.md): the API the trainer reports to,
and the environment the operator gives trainer pods. The operator imports them from here. Also
the files a run writes to output.dir, which users, `kubetune compare` and the operator read."""

from __future__ import annotations

API_GROUP = "kubetune.io"
API_VERSION = "v1alpha1"
API_PLURAL = "trainingruns"

RUN_NAME_ENV = "KUBETUNE_RUN_NAME"  # set in trainer pods: report to this TrainingRun...
RUN_NAMESPACE_ENV = "KUBETUNE_RUN_NAMESPACE"  # ...in this namespace
TERMINATION_LOG_ENV = "KUBETUNE_TERMINATION_LOG"  # where to leave the error for the pod's status

# output.dir
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CONFIG_FILE = "config.yaml"  # the resolved config
METRICS_FILE = "metrics.json"
LOG_HISTORY_FILE = "log_history.json"
LOSS_CURVES_FILE = "loss_curves.png"
PREFLIGHT_FILE = "preflight.json"
PROGRESS_FILE = "progress.jsonl"
HIGH_LOSS_FILE = "high_loss_samples.jsonl"
EVAL_FILE = "eval.json"
PREDICTIONS_FILE = "predictions.jsonl"
