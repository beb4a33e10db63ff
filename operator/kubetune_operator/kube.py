"""Every Kubernetes API call the operator makes, and nothing else.

Manifests go in and objects come out as plain dicts (the shape `kubectl get -o json`
shows), so the builders and the status derivation stay pure. `CALLS` lists each
(verb, API group, resource) used here or by kopf; tests check it against the calls the
operator makes on the API emulator, and the Helm chart's RBAC against both.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import kubernetes
from kubernetes.client import ApiException

from kubetune_operator import api
from kubetune_operator import constants as c
from kubetune_operator.status import controller_uid, exceeds_quota

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
    # A create that meets an existing object (409) reads it: is it this run's, or a deleted run's?
    ("get", "", "persistentvolumeclaims"),
    ("get", "", "configmaps"),
    ("get", "", "serviceaccounts"),
    ("get", "rbac.authorization.k8s.io", "roles"),
    ("get", "rbac.authorization.k8s.io", "rolebindings"),
    ("get", "batch", "jobs"),
    ("list", "batch", "jobs"),
    ("watch", "batch", "jobs"),
    ("patch", "batch", "jobs"),  # suspend, and the run's mutable fields
    ("delete", "batch", "jobs"),  # a Kueue run's suspension, a retry
    ("list", "", "pods"),
    ("create", "", "events"),  # kopf posts core v1 Events
    ("list", "", "events"),  # a Job's FailedCreate Events, once it has had no pod for a while
)

# Held without being called. RBAC lets no one grant what they do not hold: the operator grants each run's
# trainer get/patch on the run's status. And with the OwnerReferencesPermissionEnforcement admission plugin,
# setting blockOwnerDeletion on a child needs update on the owner's finalizers.
HELD: tuple[tuple[str, str, str], ...] = (
    ("get", api.GROUP, f"{api.PLURAL}/status"),
    ("update", api.GROUP, f"{api.PLURAL}/finalizers"),
)


class CreateRefused(Exception):
    """The API server refused a child for good (400, 403, 404, 422): retrying the same request cannot help."""

    def __init__(self, kind: str, name: str, status: int, message: str) -> None:
        super().__init__(f"{kind} {name}: {status} {message}")
        self.kind, self.name, self.status, self.server_message = kind, name, status, message


class ChildBlocked(Exception):
    """A child cannot be created yet: its name is held by another owner's object (a deleted run's, still
    being garbage-collected) or a ResourceQuota is full. Transient: retried."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def server_message(exc: ApiException) -> str:
    """The message of the Status the API server answered with."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason or "")
    except ValueError:
        return str(exc.body or exc.reason or "")


class Kube:
    """The operator's API calls over one kubernetes ApiClient (sync; kopf runs sync handlers in threads)."""

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.batch = kubernetes.client.BatchV1Api(client)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        # kind -> (create, read) of the children the operator makes.
        self._verbs: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
            "PersistentVolumeClaim": (
                self.core.create_namespaced_persistent_volume_claim,
                self.core.read_namespaced_persistent_volume_claim,
            ),
            "ConfigMap": (self.core.create_namespaced_config_map, self.core.read_namespaced_config_map),
            "ServiceAccount": (self.core.create_namespaced_service_account, self.core.read_namespaced_service_account),
            "Role": (self.rbac.create_namespaced_role, self.rbac.read_namespaced_role),
            "RoleBinding": (self.rbac.create_namespaced_role_binding, self.rbac.read_namespaced_role_binding),
            "Job": (self.batch.create_namespaced_job, self.batch.read_namespaced_job),
        }

    def _dict(self, obj: Any) -> dict[str, Any]:
        return self.client.sanitize_for_serialization(obj)

    def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """Create a child; when one exists already (creating is idempotent), return it: this run's own, or the
        volume that outlives runs (whoever made it). None once it is made.

        Raises ChildBlocked when the name is held by an object of another owner (a deleted run of the same
        name whose children are still being garbage-collected), or by one being deleted; CreateRefused
        when the server refuses the object itself."""
        kind, meta = manifest["kind"], manifest["metadata"]
        create, _ = self._verbs[kind]
        try:
            create(namespace=meta["namespace"], body=manifest)
        except ApiException as exc:
            if exc.status == 409:
                return self._check_existing(manifest)
            if exc.status == 403 and exceeds_quota(server_message(exc)):
                raise ChildBlocked(
                    c.REASON_QUOTA, f"Cannot create {kind} {meta['name']} yet: {server_message(exc)}."
                ) from exc
            if exc.status in (400, 403, 404, 422):
                raise CreateRefused(kind, meta["name"], exc.status, server_message(exc)) from exc
            raise
        log.info("Created %s %s", kind, meta["name"])
        return None

    def _check_existing(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """A 409: the object, if it is this run's; ChildBlocked otherwise. An object without owner (the volume
        an earlier run of this name kept) is used by a run that keeps its volume too, not adopted by one that
        would delete it; one another owner holds, or being deleted, goes with it (garbage collection)."""
        meta = manifest["metadata"]
        owner = controller_uid(manifest)
        _, read = self._verbs[manifest["kind"]]
        try:
            found = self._dict(read(meta["name"], meta["namespace"]))
        except ApiException as exc:
            if exc.status == 404:  # gone between the create and the read: the next pass creates it
                raise ChildBlocked(c.REASON_BLOCKED, f"{manifest['kind']} {meta['name']} was just deleted.") from exc
            raise
        holder = controller_uid(found)
        if holder not in (None, owner) or found["metadata"].get("deletionTimestamp"):
            raise ChildBlocked(
                c.REASON_BLOCKED,
                f"{manifest['kind']} {meta['name']} still exists from an earlier TrainingRun of this name (or is "
                "being deleted); waiting for Kubernetes to remove it before creating this run's own.",
            )
        if holder is None and owner is not None:
            volume = manifest["kind"] == "PersistentVolumeClaim"
            keep = " or set spec.storage.deleteWithRun: false to train on it" if volume else ""
            raise ChildBlocked(
                c.REASON_BLOCKED,
                f"{manifest['kind']} {meta['name']} exists and belongs to no TrainingRun (an earlier run of this "
                f"name kept it, or it was made by hand); this run would delete it with itself, so it waits. "
                f"Delete it (kubectl -n {meta['namespace']} delete {manifest['kind'].lower()} {meta['name']}){keep}.",
            )
        return found

    def children(
        self, namespace: str, run: str, uid: str, pods: bool = False
    ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        """The run's Jobs by name, and every pod with the run's label (when it has a Job, or `pods` asks).
        Jobs another owner controls (those of a deleted run of the same name, not yet garbage-collected) or
        being deleted are not the run's; their pods are listed, and sorted by owner later."""
        selector = f"{c.LABEL_RUN}={run}"
        found = [self._dict(j) for j in self.batch.list_namespaced_job(namespace, label_selector=selector).items]
        jobs = {
            j["metadata"]["name"]: j
            for j in found
            if not j["metadata"].get("deletionTimestamp") and controller_uid(j) == uid
        }
        if not jobs and not pods:
            return {}, []  # spare the second request (new runs are most of a burst)
        found_pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        return jobs, [self._dict(p) for p in found_pods]

    def failed_creates(self, namespace: str, job_uid: str) -> list[dict[str, Any]]:
        """The FailedCreate Events of a Job: the Job controller's word on a pod it cannot create."""
        selector = f"involvedObject.uid={job_uid},reason={c.EVENT_FAILED_CREATE}"
        found = self.core.list_namespaced_event(namespace, field_selector=selector).items
        return [self._dict(e) for e in found]

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.batch.patch_namespaced_job(name, namespace, body=patch, _content_type=MERGE_PATCH)

    def set_job_suspended(self, namespace: str, name: str, suspend: bool) -> None:
        self.patch_job(namespace, name, {"spec": {"suspend": suspend}})

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and, in the background, its pods (they get SIGTERM: the trainer checkpoints)."""
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise
        log.info("Deleted Job %s", name)

    def patch_run_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, body={"status": status}, _content_type=MERGE_PATCH
        )


def is_transient(exc: BaseException) -> bool:
    """API failures worth retrying: throttling, server errors, and no connection at all. Not client-side errors
    (the kubernetes client's own validation) nor other 4xx: retrying cannot fix them. (A full quota, and a name
    another owner holds, are ChildBlocked, which callers catch first.)"""
    if isinstance(exc, ApiException):
        return exc.status == 429 or (exc.status or 0) >= 500
    return isinstance(exc, OSError) or "MaxRetryError" in type(exc).__name__
