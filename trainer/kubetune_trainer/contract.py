"""Names the trainer and the operator share (ARCHITECTURE.md): the API the trainer reports to,
and the environment the operator gives trainer pods. The operator imports them from here."""

from __future__ import annotations

API_GROUP = "kubetune.io"
API_VERSION = "v1alpha1"
API_PLURAL = "trainingruns"

RUN_NAME_ENV = "KUBETUNE_RUN_NAME"  # set in trainer pods: report to this TrainingRun...
RUN_NAMESPACE_ENV = "KUBETUNE_RUN_NAMESPACE"  # ...in this namespace
TERMINATION_LOG_ENV = "KUBETUNE_TERMINATION_LOG"  # where to leave the error for the pod's status
