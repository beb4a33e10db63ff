"""kopf handlers: observe the run's children once, derive its status (pure), act, patch status once.

Three routes lead to the same `reconcile`:
- the run's own changes (create, operator restart, spec update), retried by kopf with
  backoff when the API fails (TemporaryError);
- its Jobs' events, which move as pods start and end;
- a resync every `resync_seconds` over the runs that are not finished, which catches what
  no event announces (a pod that stays unschedulable, an image that never pulls).

No handler is a timer or daemon and none handles deletion, so kopf puts no finalizer on
TrainingRuns: deleting one never waits for the operator. Children go by ownerReferences.

    kopf run --standalone -m kubetune_operator.handlers [--namespace NS | --all-namespaces]
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any

import kopf
import kubernetes
from pydantic import ValidationError

from kubetune_operator import api, resources
from kubetune_operator import constants as c
from kubetune_operator.kube import Kube, is_transient
from kubetune_operator.status import Derived, JobView, Observation, derive

log = logging.getLogger(__name__)


def settings_from_env(env: dict[str, str] | None = None) -> resources.OperatorSettings:
    """Operator-wide settings; the Helm chart sets these on the Deployment."""
    env = dict(os.environ if env is None else env)
    defaults = resources.OperatorSettings()
    secrets = tuple(s for s in env.get("KUBETUNE_IMAGE_PULL_SECRETS", "").split(",") if s)
    return resources.OperatorSettings(
        trainer_image=env.get("KUBETUNE_TRAINER_IMAGE", defaults.trainer_image),
        image_pull_policy=env.get("KUBETUNE_IMAGE_PULL_POLICY", defaults.image_pull_policy),
        image_pull_secrets=secrets,
    )


def validate(spec: Any, name: str) -> tuple[api.TrainingRunSpec | None, str | None]:
    """The spec as the operator will act on it, or why it cannot. The API server normally rejects a bad
    spec, but an old CRD, a disabled admission path or a hand-edited object can still deliver one."""
    problems = []
    if len(name) > c.MAX_RUN_NAME:
        problems.append(f"metadata.name: {len(name)} characters; at most {c.MAX_RUN_NAME} (children add a suffix)")
    try:
        parsed = api.TrainingRunSpec.model_validate(spec or {})
    except ValidationError as exc:
        parsed = None
        for err in exc.errors(include_url=False):
            path = ".".join(str(p) for p in ("spec", *err["loc"]))
            shown = "" if err["type"] in ("missing", "value_error") else f" (got {err.get('input')!r})"
            problems.append(f"{path}: {err['msg'].removeprefix('Value error, ')}{shown}")
    if problems:
        return None, "Invalid spec: " + "; ".join(problems) + ". Fix it in a new TrainingRun (the spec is fixed)."
    return parsed, None


def observe(kube: Kube, body: dict[str, Any], spec: api.TrainingRunSpec | None, invalid: str | None) -> Observation:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    jobs, pods = kube.children(namespace, name) if invalid is None else ({}, [])

    def job_view(component: str) -> JobView | None:
        job = jobs.get(resources.child_name(name, component))
        if job is None:
            return None
        owned = [p for p in pods if p["metadata"].get("labels", {}).get("job-name") == job["metadata"]["name"]]
        return JobView.from_dict(job, owned)

    volume = None
    if spec is not None:
        volume = resources.volume_claim_name(resources.RunRef(name, namespace, meta.get("uid", "")), spec)
    return Observation(
        name=name,
        generation=int(meta.get("generation") or 1),
        spec=spec,
        invalid=invalid,
        prepare=job_view(c.PREPARE),
        train=job_view(c.TRAIN),
        previous=dict(body.get("status") or {}),
        now=datetime.now(timezone.utc),
        volume=volume,
    )


def act(
    kube: Kube, settings: resources.OperatorSettings, body: dict[str, Any], obs: Observation, derived: Derived
) -> bool:
    """Create the children the run is due and steer the training Job; True if anything changed."""
    spec = obs.spec
    if spec is None or (obs.previous.get("phase") in c.TERMINAL and derived.phase in c.TERMINAL):
        return False
    meta = body["metadata"]
    run = resources.RunRef(meta["name"], meta["namespace"], meta["uid"])
    changed = False
    if obs.prepare is None:
        for manifest in resources.base_children(run, spec, settings):
            changed |= kube.create(manifest)
    elif obs.prepare.complete and obs.train is None and derived.phase != c.FAILED:
        changed |= kube.create(resources.train_job(run, spec, settings))
    elif obs.train is not None and not (obs.train.complete or obs.train.failed_condition):
        # Suspend on request or when the run failed in a way the Job cannot see. Unsuspending a queued
        # Job is Kueue's decision, not ours.
        want = spec.suspend or derived.stop_train or (obs.train.suspended and bool(spec.queue_name))
        if want != obs.train.suspended:
            kube.set_job_suspended(run.namespace, obs.train.name, want)
            changed = True
    return changed


OPERATOR_FIELDS = set(api.TrainingRunStatus.OPERATOR_FIELDS)


def status_patch(previous: dict[str, Any], derived: Derived) -> dict[str, Any] | None:
    """The merge patch of the operator's own status fields, or None when nothing changed."""
    mine = {k: v for k, v in previous.items() if k in OPERATOR_FIELDS}
    return None if mine == derived.status else derived.status


def reconcile(kube: Kube, settings: resources.OperatorSettings, body: dict[str, Any]) -> Derived:
    """One pass: observe, derive, act, observe again if acting changed anything, patch the status once."""
    meta = body["metadata"]
    spec, invalid = validate(body.get("spec"), meta["name"])
    obs = observe(kube, body, spec, invalid)
    derived = derive(obs)
    if act(kube, settings, body, obs, derived):
        obs = observe(kube, body, spec, invalid)
        derived = derive(obs)
    patch = status_patch(obs.previous, derived)
    if patch is not None:
        kube.patch_run_status(meta["namespace"], meta["name"], patch)
        if (obs.previous.get("phase"), obs.previous.get("reason")) != derived.summary:
            warning = derived.phase == c.FAILED or derived.reason in (c.REASON_UNSCHEDULABLE, c.REASON_IMAGE_PULL)
            kopf.event(
                body,
                type="Warning" if warning else "Normal",
                reason=derived.reason or derived.phase,
                message=f"{derived.phase}: {derived.message}"[:1000],
            )
    return derived


# --------------------------------------------------------------------------- operator state


class Runs:
    """What the operator knows of: the runs in its scope (from kopf's events) and a lock per run."""

    def __init__(self) -> None:
        self.bodies: dict[tuple[str, str], dict[str, Any]] = {}
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    def lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._guard:
            return self._locks[key]

    def forget(self, key: tuple[str, str]) -> None:
        with self._guard:
            self.bodies.pop(key, None)
            self._locks.pop(key, None)


def _reconcile_locked(memo: kopf.Memo, body: dict[str, Any]) -> Derived:
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    with memo.runs.lock(key):
        return reconcile(memo.kube, memo.settings, body)


async def _resync_forever(memo: kopf.Memo) -> None:
    while True:
        await asyncio.sleep(memo.resync_seconds)
        for key, body in list(memo.runs.bodies.items()):
            if (body.get("status") or {}).get("phase") in c.TERMINAL:
                continue
            try:
                await asyncio.to_thread(_reconcile_locked, memo, body)
            except Exception:  # one run's failure must not stop the loop; it is retried next round
                log.exception("resync of %s/%s failed", *key)


# --------------------------------------------------------------------------- handlers


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.posting.enabled = False  # our events say what changed; kopf's say which handler ran
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    if os.environ.get("KUBECONFIG"):
        kubernetes.config.load_kube_config()
    else:
        kubernetes.config.load_incluster_config()
    memo.kube = Kube(kubernetes.client.ApiClient())
    memo.settings = settings_from_env()
    memo.runs = Runs()
    memo.resync_seconds = float(os.environ.get("KUBETUNE_RESYNC_SECONDS", "30"))
    memo.resync = asyncio.create_task(_resync_forever(memo))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task = getattr(memo, "resync", None)
    if task is not None:
        task.cancel()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_via_client(**kwargs)


@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL, field="spec")
def on_run(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    raw = dict(body)
    memo.runs.bodies[(body.namespace, body.name)] = raw
    try:
        _reconcile_locked(memo, raw)
    except Exception as exc:
        if is_transient(exc):
            raise kopf.TemporaryError(f"Kubernetes API: {exc}", delay=min(2**retry, 60)) from exc
        raise


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
def remember_run(event: dict[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    key = (body.namespace, body.name)
    if event.get("type") == "DELETED":
        memo.runs.forget(key)
    else:
        memo.runs.bodies[key] = dict(body)


@kopf.on.event("batch", "v1", "jobs", labels={c.LABEL_MANAGED_BY: c.MANAGED_BY})
def on_job(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    run = (body.namespace, body.metadata.get("labels", {}).get(c.LABEL_RUN))
    owner = memo.runs.bodies.get(run)
    if owner is None:
        return  # not a run this operator watches (another namespace), or it is being deleted
    try:
        _reconcile_locked(memo, owner)
    except Exception:  # the next event or the resync reconciles again
        log.exception("reconcile of %s/%s after a Job event failed", *run)
