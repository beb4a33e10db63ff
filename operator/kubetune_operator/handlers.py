"""kopf handlers: observe the run's children once, derive its status (pure), act, patch status once.

Three routes lead to the same `reconcile`:
- the run's own changes (create, operator restart, spec update), retried by kopf with
  backoff when the API fails (TemporaryError);
- its Jobs' events, which move as pods start and end;
- a resync every `resync_seconds` over the runs that are not finished, which catches what
  no event announces (a pod that stays unschedulable, an image that never pulls, a pod the Job
  controller cannot create: a Job without a live pod KUBETUNE_POD_CREATE_GRACE_SECONDS (20) after
  its start has its FailedCreate Events read, and only then).
Each pass runs under the run's lock, on the newest body kopf has delivered for it.

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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import kopf
import kubernetes
from pydantic import ValidationError

from kubetune_operator import api, resources
from kubetune_operator import constants as c
from kubetune_operator.kube import ChildBlocked, CreateRefused, Kube, is_transient
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.status import (
    Derived,
    JobView,
    Observation,
    PodLedger,
    PodView,
    awaits_pod,
    derive,
    old_pods,
    pod_create_failure,
    prepared,
)

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
        pod_create_grace_seconds=float(env.get("KUBETUNE_POD_CREATE_GRACE_SECONDS", defaults.pod_create_grace_seconds)),
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
        return None, "Invalid spec: " + "; ".join(problems) + "."
    return parsed, None


def observe(
    kube: Kube,
    body: dict[str, Any],
    spec: api.TrainingRunSpec | None,
    invalid: str | None,
    memory: RunMemory,
    previous: dict[str, Any],
    grace: float = c.POD_CREATE_GRACE_SECONDS,
) -> Observation:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    run = resources.RunRef(name, namespace, meta.get("uid", ""))
    # Listed also when the spec is invalid: a run that turns invalid while training must be stopped. Pods
    # also when no Job is left, once a training Job was made: a deleted one's may still run (old_pods).
    jobs, pods = kube.children(namespace, name, run.uid, pods=bool(previous.get("jobName")))
    memory.job_versions = {n: j["metadata"].get("resourceVersion", "") for n, j in jobs.items()}
    now = datetime.now(timezone.utc)
    views = tuple(PodView.from_dict(p) for p in pods)
    # By the controller's uid, not the job-name label: a replaced Job's pods carry the same name.
    owned: defaultdict[str | None, list[PodView]] = defaultdict(list)
    for pod in views:
        owned[pod.owner_uid].append(pod)

    def job_view(component: str) -> JobView | None:
        job = jobs.get(resources.child_name(name, component))
        if job is None:
            return None
        uid = job["metadata"].get("uid")
        view = JobView.from_dict(job, owned.get(uid, ()))
        if uid and awaits_pod(view, now, grace):  # only then: most passes read no Events
            view = replace(view, create_failure=pod_create_failure(kube.failed_creates(namespace, uid), view))
        return view

    train = job_view(c.TRAIN)
    suspended = invalid is not None or bool(spec and spec.suspend) or bool(train and train.suspended)
    restarts = memory.ledger.look(train, suspended=suspended)
    volume = output = None
    if spec is not None:
        volume, output = resources.volume_claim_name(run, spec), resources.output_path(run, spec)
    return Observation(
        name=name,
        generation=int(meta.get("generation") or 1),
        spec=spec,
        invalid=invalid,
        prepare=job_view(c.PREPARE),
        train=train,
        previous=previous,
        now=now,
        volume=volume,
        output=output,
        pods=views,
        restarts=restarts,
    )


def _suspend(kube: Kube, namespace: str, job: JobView | None, suspend: bool) -> JobView | None:
    """Set an unfinished Job's spec.suspend, where it differs; return the Job as it now stands."""
    if job is None or job.finished or job.suspended == suspend:
        return job
    kube.set_job_suspended(namespace, job.name, suspend)
    return replace(job, suspended=suspend)


def _stop(kube: Kube, namespace: str, obs: Observation) -> Observation:
    """Stop the run's unfinished Jobs. A Kueue Job is deleted, not suspended: Kueue starts any suspended Job
    whose workload it has admitted. Its pods get SIGTERM either way, and the trainer saves a checkpoint."""
    train = obs.train
    if train is not None and train.kueue and not train.finished:
        kube.delete_job(namespace, train.name)
        train = None
    train, prepare = _suspend(kube, namespace, train, True), _suspend(kube, namespace, obs.prepare, True)
    if train is obs.train and prepare is obs.prepare:
        return obs
    return replace(obs, train=train, prepare=prepare)


def _create_base(kube: Kube, run: resources.RunRef, manifests: list[dict[str, Any]]) -> bool:
    """Create the base children; say at once every one that is blocked, and hold the prepare Job back
    while any is (its pod would mount an old run's volume or config). True when the run's volume was there
    already, made for another run (one of the same name, deleted, whose volume was kept)."""
    blocked: list[ChildBlocked] = []
    earlier = False
    for manifest in manifests:
        if manifest["kind"] == "Job" and blocked:
            break
        try:
            found = kube.create(manifest)
        except ChildBlocked as exc:
            blocked.append(exc)
            continue
        if found is not None and manifest["kind"] == "PersistentVolumeClaim":
            earlier = (found["metadata"].get("annotations") or {}).get(c.ANNOTATION_RUN_UID) != run.uid
    if blocked:
        raise ChildBlocked(blocked[0].reason, " ".join(str(b) for b in blocked))
    return earlier


def act(
    kube: Kube, settings: resources.OperatorSettings, run: resources.RunRef, obs: Observation, derived: Derived
) -> Observation:
    """Create the children the run is due and steer its Jobs; return the observation as it now stands
    (from what was just done, so nothing needs listing again)."""
    ns, spec = run.namespace, obs.spec
    if derived.retry and obs.train is not None:
        # The failed Job cannot run again; its replacement (next pass, once this one is gone) resumes from
        # the newest checkpoint on the volume. reconcile has written the Retrying status already.
        kube.delete_job(ns, obs.train.name)
        return replace(obs, train=None)
    if derived.stop_jobs:
        obs = _stop(kube, ns, obs)
    if spec is None or derived.phase in c.TERMINAL:
        return obs  # stopped above if it had to be; the TTL comes after the status is written (expire)
    prepare, train = obs.prepare, obs.train
    if not prepared(obs):
        if prepare is None:
            if spec.suspend:
                return obs  # a run made suspended gets nothing until it is resumed
            earlier = _create_base(kube, run, resources.base_children(run, spec, settings))
            return replace(obs, prepare=JobView(resources.child_name(run.name, c.PREPARE)), earlier_volume=earlier)
        # Suspended on request (its pod stops; preparing starts again on resume), or resumed: also after the
        # spec was invalid for a while.
        if (updated := _suspend(kube, ns, prepare, spec.suspend)) is not prepare:
            obs = replace(obs, prepare=updated)
        return obs
    if train is None:
        if spec.suspend:
            return obs  # made on resume: a suspended Kueue Job would be started by Kueue
        if old_pods(obs):
            return obs  # a deleted Job's trainer still runs on the volume: the status says so (resync retries)
        job = resources.train_job(run, spec, settings)
        kube.create(job)
        view = JobView(job["metadata"]["name"], suspended=job["spec"]["suspend"], kueue=bool(spec.queue_name))
        return replace(obs, train=view)
    if train.finished:
        return obs
    if spec.suspend:
        obs = _stop(kube, ns, obs)
        if obs.train is None:
            return obs  # a Kueue Job is deleted; its replacement is made on resume
    elif not train.kueue and (updated := _suspend(kube, ns, train, False)) is not train:
        obs = replace(obs, train=updated)  # resumed; unsuspending a queued Job is Kueue's decision, not ours
    if (patch := resources.job_patch(train, spec, c.TRAIN, run_ended=False)) is not None:
        kube.patch_job(ns, train.name, patch)
    return obs


def expire(kube: Kube, namespace: str, obs: Observation) -> None:
    """Once the run's end is written: give its Jobs spec.ttlSecondsAfterFinished (or take it away)."""
    if obs.spec is None:
        return
    for component, job in ((c.PREPARE, obs.prepare), (c.TRAIN, obs.train)):
        if job is not None and (patch := resources.job_patch(job, obs.spec, component, run_ended=True)):
            kube.patch_job(namespace, job.name, patch)


OPERATOR_FIELDS = set(api.TrainingRunStatus.OPERATOR_FIELDS)


def with_operator_status(status: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    """`status` with the operator's fields as in `mine` (those `mine` lacks removed); the trainer's kept."""
    return {k: v for k, v in status.items() if k not in OPERATOR_FIELDS} | mine


def status_patch(previous: dict[str, Any], derived: Derived) -> dict[str, Any] | None:
    """The merge patch of the operator's own status fields (null removes one), or None when nothing changed."""
    mine = {k: v for k, v in previous.items() if k in OPERATOR_FIELDS}
    patch: dict[str, Any] = {k: v for k, v in derived.status.items() if mine.get(k) != v}
    patch.update({k: None for k in mine if k not in derived.status})
    return patch or None


def refused(exc: CreateRefused) -> str:
    advice = (
        "Check the operator's RBAC (the Helm chart's) and the namespace's admission policies"
        if exc.status == 403
        else "Fix the spec in a new TrainingRun"
    )
    return (
        f"The API server refused to create {exc.kind} {exc.name} ({exc.status}): {exc.server_message.rstrip('.')}. "
        f"{advice}."
    )


@dataclass
class RunMemory:
    """What the operator remembers of one run between passes: of one run, by its uid, not its name (a run
    deleted and applied again is another run, also when the operator missed the deletion)."""

    uid: str = ""
    ledger: PodLedger = field(default_factory=PodLedger)  # its training pods, for restarts
    job_versions: dict[str, str] = field(default_factory=dict)  # resourceVersion of each Job last observed
    # The operator's status fields as last written. Only the operator writes them, so they are fresher than
    # any cached body: a watch event may still carry the status from before the last patch.
    status: dict[str, Any] | None = None


def reconcile(
    kube: Kube,
    settings: resources.OperatorSettings,
    body: dict[str, Any],
    memory: RunMemory | None = None,
    post_event: Callable[..., None] = kopf.event,
) -> Derived:
    """One pass: observe, derive, act, derive what acting made, patch the status once (if it changed), post
    one Event per change of phase or reason.

    Raises ChildBlocked (retry later) and CreateRefused (the run failed for good) once the status says so."""
    memory = RunMemory() if memory is None else memory
    meta = body["metadata"]
    run = resources.RunRef(meta["name"], meta["namespace"], meta.get("uid", ""))
    spec, invalid = validate(body.get("spec"), run.name)
    previous = dict(body.get("status") or {})
    if memory.status is not None:
        previous = with_operator_status(previous, memory.status)
    obs = observe(kube, body, spec, invalid, memory, previous, settings.pod_create_grace_seconds)
    derived = derive(obs)
    if derived.retry:
        # Said before the failed Job is deleted: were it deleted and this write lost (an API error, an operator
        # restart), the run would stay Failed with nothing left to retry from. Said first, a lost deletion is
        # redone by the next pass (status.retry_due).
        previous = publish(kube, run, body, memory, previous, derived, post_event)
    problem: ChildBlocked | CreateRefused | None = None
    try:
        acted = act(kube, settings, run, obs, derived)
    except ChildBlocked as exc:
        problem, acted = exc, obs
        derived = derive(replace(obs, blocked=(exc.reason, str(exc))))
    except CreateRefused as exc:
        problem, acted = exc, obs
        derived = derive(replace(obs, create_error=refused(exc)))
    # A terminal verdict stands: what acting on it does (stopping a Job) must not be read back as progress;
    # nor a retry's, whose replacement Job comes once the failed one is gone.
    if acted is not obs and derived.phase not in c.TERMINAL and not derived.retry:
        obs, derived = acted, derive(acted)
    publish(kube, run, body, memory, previous, derived, post_event)
    if derived.phase in c.TERMINAL:
        expire(kube, run.namespace, obs)
    if problem is not None:
        raise problem
    return derived


def publish(
    kube: Kube,
    run: resources.RunRef,
    body: dict[str, Any],
    memory: RunMemory,
    previous: dict[str, Any],
    derived: Derived,
    post_event: Callable[..., None],
) -> dict[str, Any]:
    """Patch the run's status to `derived` (if it changed) and post an Event when its phase or reason did;
    return the status as it now stands."""
    patch = status_patch(previous, derived)
    if patch is None:
        return previous
    kube.patch_run_status(run.namespace, run.name, patch)
    memory.status = dict(derived.status)
    body["status"] = with_operator_status(body.get("status") or {}, derived.status)  # the cache resync and metrics read
    if (previous.get("phase"), previous.get("reason")) != derived.summary:
        warning = derived.phase == c.FAILED or derived.reason in c.WARNING_REASONS
        post_event(
            body,
            type="Warning" if warning else "Normal",
            reason=derived.reason or derived.phase,
            message=f"{derived.phase}: {derived.message}"[:1000],
        )
    return with_operator_status(previous, derived.status)


# --------------------------------------------------------------------------- operator state


class Runs:
    """What the operator knows of: the runs in its scope (from kopf's events) and a lock per run."""

    def __init__(self) -> None:
        self.bodies: dict[tuple[str, str], dict[str, Any]] = {}
        self.memory: dict[tuple[str, str], RunMemory] = {}
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()
        # kopf's event poster is reached through context variables that only handler calls carry;
        # the resync loop runs its reconciles in a copy of a handler's context.
        self.handler_context: contextvars.Context | None = None

    def lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._guard:
            return self._locks[key]

    def memory_of(self, body: dict[str, Any]) -> RunMemory:
        """The memory of this very run: a new one when the name now belongs to a run with another uid."""
        meta = body["metadata"]
        key, uid = (meta["namespace"], meta["name"]), meta.get("uid", "")
        with self._guard:
            memory = self.memory.get(key)
            if memory is None or memory.uid != uid:
                memory = self.memory[key] = RunMemory(uid=uid)
            return memory

    def forget(self, key: tuple[str, str]) -> None:
        with self._guard:
            self.bodies.pop(key, None)
            self.memory.pop(key, None)
            self._locks.pop(key, None)


def _reconcile_locked(memo: kopf.Memo, body: dict[str, Any], trigger: str) -> Derived | None:
    """Reconcile the run of `body` under its lock, from its newest body: the caller's may have been taken before
    another pass (a spec update's) held the lock, and acting on an older spec would undo that pass (unsuspend a
    Job just suspended, put back an old backoffLimit). None when the run is gone meanwhile."""
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    with memo.runs.lock(key):
        latest = memo.runs.bodies.get(key)
        if latest is None:
            return None  # deleted (or never seen by kopf): nothing to reconcile
        return memo.metrics.observe(
            trigger,
            lambda: reconcile(memo.kube, memo.settings, latest, memo.runs.memory_of(latest), memo.post_event),
        )


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
            except (ChildBlocked, CreateRefused) as exc:  # the status says so; a blocked run is retried
                log.warning("resync of %s/%s: %s", *key, exc)
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
    memo.post_event = kopf.event
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
    delay = min(2**retry, 60)
    try:
        _reconcile_locked(memo, raw, "run")
    except ChildBlocked as exc:
        raise kopf.TemporaryError(str(exc), delay=delay) from exc
    except CreateRefused as exc:
        raise kopf.PermanentError(refused(exc)) from exc
    except Exception as exc:
        if is_transient(exc):
            raise kopf.TemporaryError(f"Kubernetes API: {exc}", delay=delay) from exc
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
    memory = memo.runs.memory.get(run)
    if memory is not None and memory.job_versions.get(name) == meta.get("resourceVersion"):
        return  # the last pass saw this very version of the Job (resourceVersions are only compared for equality)
    try:
        _reconcile_locked(memo, owner, "job")
    except (ChildBlocked, CreateRefused) as exc:  # the status says so; on_run and the resync retry
        log.warning("reconcile of %s/%s after a Job event: %s", *run, exc)
    except Exception:  # the next event or the resync reconciles again
        log.exception("reconcile of %s/%s after a Job event failed", *run)
