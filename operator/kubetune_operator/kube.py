"""Every Kubernetes API call the operator makes, and nothing else.

Manifests go in and objects come out as plain dicts (the shape `kubectl get -o json`
shows), so the builders and the status derivation stay pure. `CALLS` lists each
(verb, API group, resource) used here or by kopf; tests check it against the calls the
operator makes on the API emulator, and the Helm chart's RBAC against both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import kubernetes
from kubernetes.client import ApiException

from kubetune_operator import api
from kubetune_operator import constants as c

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"

CALLS: tuple[tuple[str, str, str], ...] = (
    ("list", api.GROUP, api.PLURAL),
    ("watch", api.GROUP, api.PLURAL),
    ("patch", api.GROUP, api.PLURAL),  # kopf's progress annotations
    ("patch", api.GROUP, f"{api.PLURAL}/status"),
    ("create", "", "persistentvolumeclaims"),
    ("create", "", "configmaps"),
    ("create", "", "serviceaccounts"),
    ("create", "rbac.authorization.k8s.io", "roles"),
    ("create", "rbac.authorization.k8s.io", "rolebindings"),
    ("create", "batch", "jobs"),
    ("list", "batch", "jobs"),
    ("watch", "batch", "jobs"),
    ("patch", "batch", "jobs"),
    ("list", "", "pods"),
    ("create", "", "events"),  # kopf posts core v1 Events
)


class Kube:
    """The operator's API calls over one kubernetes ApiClient (sync; kopf runs sync handlers in threads)."""

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.batch = kubernetes.client.BatchV1Api(client)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    def _dict(self, obj: Any) -> dict[str, Any]:
        return self.client.sanitize_for_serialization(obj)

    def create(self, manifest: dict[str, Any]) -> bool:
        """Create a child; False if it exists already (creating is idempotent)."""
        creators: dict[str, Callable[..., Any]] = {
            "PersistentVolumeClaim": self.core.create_namespaced_persistent_volume_claim,
            "ConfigMap": self.core.create_namespaced_config_map,
            "ServiceAccount": self.core.create_namespaced_service_account,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
            "Job": self.batch.create_namespaced_job,
        }
        try:
            creators[manifest["kind"]](namespace=manifest["metadata"]["namespace"], body=manifest)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        log.info("Created %s %s", manifest["kind"], manifest["metadata"]["name"])
        return True

    def children(self, namespace: str, run: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        """The run's Jobs by name, and their pods."""
        selector = f"{c.LABEL_RUN}={run}"
        jobs = self.batch.list_namespaced_job(namespace, label_selector=selector).items
        if not jobs:
            return {}, []  # no Job, no pods: spare the second request (new runs are most of a burst)
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        return {j.metadata.name: self._dict(j) for j in jobs}, [self._dict(p) for p in pods]

    def set_job_suspended(self, namespace: str, name: str, suspend: bool) -> None:
        self.batch.patch_namespaced_job(name, namespace, body={"spec": {"suspend": suspend}}, _content_type=MERGE_PATCH)

    def patch_run_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, body={"status": status}, _content_type=MERGE_PATCH
        )

    def list_runs(self, namespace: str | None) -> list[dict[str, Any]]:
        if namespace:
            found = self.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL)
        else:
            found = self.custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL)
        return list(found.get("items", []))


def is_transient(exc: BaseException) -> bool:
    """API failures worth retrying: throttling, server errors, conflicts, and no connection at all."""
    if isinstance(exc, ApiException):
        return exc.status in (409, 429) or (exc.status or 0) >= 500
    return (
        isinstance(exc, (OSError, kubernetes.client.exceptions.OpenApiException))
        or "MaxRetryError" in type(exc).__name__
    )
