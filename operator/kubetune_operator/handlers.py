"""kopf handlers: observe the run's children once, derive its status (pure), act, patch status once.

Three routes lead to the same `reconcile`:
- the run's own changes (create, operator restart, spec update), retried by kopf with
  backoff when the API fails (TemporaryError);
- its Jobs' events, which move as pods start and end;
- a resync every `resync_seconds` over the runs that are not finished, which catches what
  no event announces (a pod that stays unschedulable, an image that never pulls).

The operator's /metrics (metrics.py) serves a collector over the runs it knows and its own
reconcile counts and durations, on KUBETUNE_METRICS_PORT (8080; 0 turns it off).

No handler is a timer or daemon and none handles deletion, so kopf puts no finalizer on
TrainingRuns: deleting one never waits for the operator. Children go by ownerReferences.

    kopf run --standalone -m kubetune_operator.handlers [--namespace NS | --all-namespaces]
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import kopf
import kubernetes
from pydantic import ValidationError

from kubetune_operator import api, resources
from kubetune_operator import constants as c
from kubetune_operator.kube import Kube, is_transient
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.status import Derived, JobView, Observation, PodLedger, derive

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


def observe(
    kube: Kube, body: dict[str, Any], spec: api.TrainingRunSpec | None, invalid: str | None, memory: RunMemory
) -> Observation:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    jobs, pods = kube.children(namespace, name) if invalid is None else ({}, [])
    memory.job_versions = {n: j["metadata"].get("resourceVersion", "") for n, j in jobs.items()}

    def job_view(component: str) -> JobView | None:
        job = jobs.get(resources.child_name(name, component))
        if job is None:
            return None
        owned = [p for p in pods if p["metadata"].get("labels", {}).get("job-name") == job["metadata"]["name"]]
        return JobView.from_dict(job, owned)

    train = job_view(c.TRAIN)
    restarts = memory.ledger.look(train, suspended=bool(spec and spec.suspend) or bool(train and train.suspended))
    volume = None
    if spec is not None:
        volume = resources.volume_claim_name(resources.RunRef(name, namespace, meta.get("uid", "")), spec)
    return Observation(
        name=name,
        generation=int(meta.get("generation") or 1),
        spec=spec,
        invalid=invalid,
        prepare=job_view(c.PREPARE),
        train=train,
        previous=dict(body.get("status") or {}),
        now=datetime.now(timezone.utc),
        volume=volume,
        restarts=restarts,
    )


def act(
    kube: Kube, settings: resources.OperatorSettings, body: dict[str, Any], obs: Observation, derived: Derived
) -> Observation:
    """Create the children the run is due and steer its Jobs; return the observation as it now stands
    (from what was just done, so nothing needs listing again)."""
    spec = obs.spec
    if spec is None or (obs.previous.get("phase") in c.TERMINAL and derived.phase in c.TERMINAL):
        return obs
    meta = body["metadata"]
    run = resources.RunRef(meta["name"], meta["namespace"], meta["uid"])
    if obs.prepare is None:
        for manifest in resources.base_children(run, spec, settings):
            kube.create(manifest)
        obs = replace(obs, prepare=JobView(resources.child_name(run.name, c.PREPARE)))
    elif obs.prepare.complete and obs.train is None and derived.phase != c.FAILED:
        job = resources.train_job(run, spec, settings)
        kube.create(job)
        obs = replace(obs, train=JobView(job["metadata"]["name"], suspended=job["spec"]["suspend"]))
    elif obs.train is not None and not (obs.train.complete or obs.train.failed_condition):
        # Suspend on request or when the run failed in a way the Job cannot see. Unsuspending a queued
        # Job is Kueue's decision, not ours.
        want = spec.suspend or derived.stop_jobs or (obs.train.suspended and bool(spec.queue_name))
        if want != obs.train.suspended:
            kube.set_job_suspended(run.namespace, obs.train.name, want)
            obs = replace(obs, train=replace(obs.train, suspended=want))
    if derived.stop_jobs and obs.prepare is not None and not obs.prepare.suspended and not obs.prepare.complete:
        kube.set_job_suspended(run.namespace, obs.prepare.name, True)
        obs = replace(obs, prepare=replace(obs.prepare, suspended=True))
    return obs


OPERATOR_FIELDS = set(api.TrainingRunStatus.OPERATOR_FIELDS)


def status_patch(previous: dict[str, Any], derived: Derived) -> dict[str, Any] | None:
    """The merge patch of the operator's own status fields, or None when nothing changed."""
    mine = {k: v for k, v in previous.items() if k in OPERATOR_FIELDS}
    return None if mine == derived.status else derived.status


@dataclass
class RunMemory:
    """What the operator remembers of one run between passes."""

    ledger: PodLedger = field(default_factory=PodLedger)  # its training pods, for restarts
    job_versions: dict[str, str] = field(default_factory=dict)  # resourceVersion of each Job last observed


def reconcile(
    kube: Kube, settings: resources.OperatorSettings, body: dict[str, Any], memory: RunMemory | None = None
) -> Derived:
    """One pass: observe, derive, act, derive what acting made, patch the status once."""
    memory = RunMemory() if memory is None else memory
    meta = body["metadata"]
    spec, invalid = validate(body.get("spec"), meta["name"])
    obs = observe(kube, body, spec, invalid, memory)
    derived = derive(obs)
    acted = act(kube, settings, body, obs, derived)
    # A terminal verdict stands: what acting on it does (stopping a Job) must not be read back as progress.
    if acted is not obs and derived.phase not in c.TERMINAL:
        obs, derived = acted, derive(acted)
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
        self.memory: defaultdict[tuple[str, str], RunMemory] = defaultdict(RunMemory)
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()
        # kopf's event poster is reached through context variables that only handler calls carry;
        # the resync loop runs its reconciles in a copy of a handler's context.
        self.handler_context: contextvars.Context | None = None

    def lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._guard:
            return self._locks[key]

    def forget(self, key: tuple[str, str]) -> None:
        with self._guard:
            self.bodies.pop(key, None)
            self.memory.pop(key, None)
            self._locks.pop(key, None)


def _reconcile_locked(memo: kopf.Memo, body: dict[str, Any], trigger: str) -> Derived:
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    with memo.runs.lock(key):
        return memo.metrics.observe(trigger, lambda: reconcile(memo.kube, memo.settings, body, memo.runs.memory[key]))


async def _resync_forever(memo: kopf.Memo) -> None:
    while True:
        await asyncio.sleep(memo.resync_seconds)
        for key, body in list(memo.runs.bodies.items()):
            if (body.get("status") or {}).get("phase") in c.TERMINAL:
                continue
            context = memo.runs.handler_context
            if context is None:
                continue  # no handler has run yet, so nothing was created to follow
            try:
                await asyncio.to_thread(context.copy().run, _reconcile_locked, memo, body, "resync")
            except Exception:  # one run's failure must not stop the loop; it is retried next round
                log.exception("resync of %s/%s failed", *key)


# --------------------------------------------------------------------------- handlers


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # Our events say what changed; kopf's own (from its log lines) only say which handler ran.
    settings.posting.level = logging.CRITICAL + 1
    # No watching of CRDs and Namespaces: the chart installs the CRD before the operator starts, and
    # --namespace names exact namespaces; this leaves the operator without any cluster-wide read.
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 16  # handlers wait on the API, not the CPU
    settings.networking.request_timeout = 60
    memo.kube = Kube(kubernetes.client.ApiClient(client_configuration()))
    memo.settings = settings_from_env()
    memo.runs = Runs()
    memo.resync_seconds = float(os.environ.get("KUBETUNE_RESYNC_SECONDS", "30"))
    memo.resync = asyncio.create_task(_resync_forever(memo))
    memo.metrics = OperatorMetrics(lambda: list(memo.runs.bodies.values()))
    if port := int(os.environ.get("KUBETUNE_METRICS_PORT", "8080")):  # 0 turns /metrics off
        try:
            memo.metrics.serve(port)
        except OSError as exc:
            raise RuntimeError(f"Cannot serve /metrics on port {port} (KUBETUNE_METRICS_PORT): {exc.strerror}") from exc


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task = getattr(memo, "resync", None)
    if task is not None:
        task.cancel()
    if (metrics := getattr(memo, "metrics", None)) is not None:
        metrics.close()


def client_configuration() -> kubernetes.client.Configuration:
    """KUBECONFIG if set (read now: the client reads it once at import), else the pod's service account."""
    config = kubernetes.client.Configuration()
    if path := os.environ.get("KUBECONFIG"):
        kubernetes.config.load_kube_config(config_file=path, client_configuration=config)
    else:
        kubernetes.config.load_incluster_config(client_configuration=config)
    return config


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    config = client_configuration()
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization") or ""
    scheme, _, token = header.rpartition(" ")
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )


@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL, field="spec")
def on_run(body: kopf.Body, name: str, namespace: str, memo: kopf.Memo, retry: int, **_: Any) -> None:
    raw = dict(body)
    memo.runs.bodies[(namespace, name)] = raw
    memo.runs.handler_context = contextvars.copy_context()
    try:
        _reconcile_locked(memo, raw, "run")
    except Exception as exc:
        if is_transient(exc):
            raise kopf.TemporaryError(f"Kubernetes API: {exc}", delay=min(2**retry, 60)) from exc
        raise


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
def remember_run(event: dict[str, Any], body: kopf.Body, name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    key = (namespace, name)
    if event.get("type") == "DELETED":
        memo.runs.forget(key)
    else:
        memo.runs.bodies[key] = dict(body)


@kopf.on.event("batch", "v1", "jobs", labels={c.LABEL_MANAGED_BY: c.MANAGED_BY})
def on_job(namespace: str, name: str, labels: kopf.Labels, meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    run = (namespace, labels.get(c.LABEL_RUN))
    owner = memo.runs.bodies.get(run)
    if owner is None:
        return  # not a run this operator watches (another namespace), or it is being deleted
    if memo.runs.memory[run].job_versions.get(name) == meta.get("resourceVersion"):
        return  # the last pass saw this very version of the Job (resourceVersions are only compared for equality)
    try:
        _reconcile_locked(memo, owner, "job")
    except Exception:  # the next event or the resync reconciles again
        log.exception("reconcile of %s/%s after a Job event failed", *run)
