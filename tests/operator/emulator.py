"""A Kubernetes API server for tests: real HTTP on 127.0.0.1, objects in memory.

It does what a real API server does for the clients here (kopf, the kubernetes client,
the trainer): discovery; create/get/list/watch/patch/replace/delete; uid,
resourceVersion, generation and creationTimestamp; the status subresource kept apart
from the rest of the object; label and field selectors; merge and JSON patches (with the
`test` op kopf uses for optimistic concurrency); finalizers and deletionTimestamp; graceful
deletion of live pods (they stay, with a deletionTimestamp, until the kubelet has stopped
them); garbage collection of dependents by ownerReferences; and the Table answers `kubectl get`
asks for, built from the CRD's printer columns; and a log of every request (who made it,
what it sent, how it was answered) for tests that count calls. It does not enforce schemas
or admission: that is what the CRD and operator tests are for.

The server runs on an event loop in a background thread. Tests reach the store through
the thread-safe `call()`; the job runner runs its coroutines on the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import re
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from aiohttp import web

T = TypeVar("T")


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = True  # has a status subresource
    short_names: tuple[str, ...] = ()
    columns: tuple[dict[str, Any], ...] = ()  # additionalPrinterColumns, for `kubectl get` tables

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        return self.group, self.plural


CRD = Path(__file__).resolve().parents[2] / "crds" / "trainingrun.yaml"


def _crd_columns(path: Path) -> list[dict[str, Any]]:
    import yaml

    (version,) = yaml.safe_load(path.read_text())["spec"]["versions"]
    return version.get("additionalPrinterColumns", [])


def _json_path(obj: Any, path: str) -> Any:
    """The simple JSONPath of printer columns: .a.b.c"""
    for part in path.strip(".").split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _age(timestamp: str) -> str:
    seconds = int(
        (datetime.now(timezone.utc) - datetime.fromisoformat(timestamp.replace("Z", "+00:00"))).total_seconds()
    )
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m"


def table(res: Resource, items: list[dict[str, Any]], resource_version: str) -> dict[str, Any]:
    """A meta.k8s.io/v1 Table, as the API server answers `kubectl get` for a CRD with printer columns."""
    columns = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
    columns += [
        {
            "name": c["name"],
            "type": c["type"],
            "format": c.get("format", ""),
            "description": c.get("description", ""),
            "priority": c.get("priority", 0),
        }
        for c in res.columns
    ]
    rows = []
    for obj in items:
        cells: list[Any] = [obj["metadata"]["name"]]
        for c in res.columns:
            value = _json_path(obj, c["jsonPath"])
            cells.append(_age(value) if c["type"] == "date" and value else value)
        meta = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}
        rows.append({"cells": cells, "object": meta})
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": columns,
        "rows": rows,
    }


RESOURCES = (
    Resource("", "v1", "namespaces", "Namespace", namespaced=False),
    Resource("", "v1", "pods", "Pod"),
    Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim"),
    Resource("", "v1", "configmaps", "ConfigMap", status=False),
    Resource("", "v1", "secrets", "Secret", status=False),
    Resource("", "v1", "serviceaccounts", "ServiceAccount", status=False),
    Resource("", "v1", "events", "Event", status=False),
    Resource("events.k8s.io", "v1", "events", "Event", status=False),
    Resource("batch", "v1", "jobs", "Job"),
    Resource("rbac.authorization.k8s.io", "v1", "roles", "Role", status=False),
    Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", status=False),
    Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", namespaced=False),
    Resource(
        "kubetune.io",
        "v1alpha1",
        "trainingruns",
        "TrainingRun",
        short_names=("tr",),
        columns=tuple(_crd_columns(CRD)),
    ),
)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def response(self) -> web.Response:
        return web.json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": self.message,
                "reason": self.reason,
                "code": self.code,
            },
            status=self.code,
        )


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 JSON patch (add, remove, replace, test): what kopf sends."""
    doc = copy.deepcopy(target)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent: Any = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last = parts[-1] if parts else None
        if op["op"] == "test":
            current = parent.get(last) if isinstance(parent, dict) else parent[int(last)]
            if current != op.get("value"):
                raise ApiError(422, "Invalid", f"test failed at {op['path']}: {current!r} != {op.get('value')!r}")
        elif op["op"] in ("add", "replace"):
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                parent.insert(index, op["value"]) if op["op"] == "add" else parent.__setitem__(index, op["value"])
            else:
                parent[last] = op["value"]
        elif op["op"] == "remove":
            parent.pop(int(last) if isinstance(parent, list) else last)
        else:
            raise ApiError(400, "BadRequest", f"unsupported JSON patch op {op['op']}")
    return doc


_SELECTOR = re.compile(r"^\s*([\w./-]+)\s*(!=|==|=|\s+in\s+|\s+notin\s+)?\s*(\(.*\)|[^,]*)\s*$")


def parse_selector(text: str | None) -> list[tuple[str, str, set[str]]]:
    """Label selector terms: (key, op, values) with op in =, !=, in, notin, exists, !exists."""
    if not text:
        return []
    terms, depth, current = [], 0, ""
    for ch in text:  # split on commas outside parentheses
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    terms.append(current)
    out = []
    for term in filter(None, (t.strip() for t in terms)):
        if term.startswith("!"):
            out.append((term[1:], "!exists", set()))
            continue
        m = _SELECTOR.match(term)
        if not m or not m.group(2):
            out.append((term, "exists", set()))
            continue
        key, op, raw = m.group(1), m.group(2).strip(), m.group(3).strip()
        values = {v.strip() for v in raw.strip("()").split(",")} if op in ("in", "notin") else {raw}
        out.append((key, {"==": "="}.get(op, op), values))
    return out


def selector_matches(labels: dict[str, str], terms: list[tuple[str, str, set[str]]]) -> bool:
    for key, op, values in terms:
        value = labels.get(key)
        ok = {
            "=": value in values,
            "in": value in values,
            "!=": value not in values,
            "notin": value not in values,
            "exists": key in labels,
            "!exists": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def field_matches(obj: dict[str, Any], text: str | None) -> bool:
    for term in filter(None, (text or "").split(",")):
        key, op, value = re.match(r"([\w.]+)(!=|==|=)(.*)", term).groups()
        actual: Any = obj
        for part in key.split("."):
            actual = actual.get(part) if isinstance(actual, dict) else None
        if (str(actual) == value) != (op != "!="):
            return False
    return True


@dataclass(frozen=True)
class Request:
    """One request as the server answered it, for tests that count what a client did."""

    user: str  # the bearer token
    method: str
    path: str
    status: int
    body: Any = None  # the JSON sent with a POST or PATCH


@dataclass
class Watcher:
    resource: Resource
    namespace: str | None
    labels: list[tuple[str, str, set[str]]]
    fields: str | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def wants(self, obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        return (
            (self.namespace is None or meta.get("namespace") == self.namespace)
            and selector_matches(meta.get("labels") or {}, self.labels)
            and field_matches(obj, self.fields)
        )


class ApiServer:
    """In-memory objects behind a Kubernetes-shaped HTTP API."""

    def __init__(self, resources: tuple[Resource, ...] = RESOURCES) -> None:
        self.resources = {r.key: r for r in resources}
        self.objects: dict[tuple[str, str], dict[tuple[str | None, str], dict[str, Any]]] = defaultdict(dict)
        self.watchers: list[Watcher] = []
        self.requests: Counter[str] = Counter()
        self._rv = itertools.count(1)
        self.rv = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.subscribers: list[Callable[[str, Resource, dict[str, Any]], None]] = []
        self.faults: list[list[Any]] = []  # [method, path regex, status, times left, message]
        self.log: list[Request] = []  # every request, in order
        # token -> {(verb, API group, resource[/subresource])}: what each client really called, for RBAC tests
        self.calls: defaultdict[str, set[tuple[str, str, str]]] = defaultdict(set)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ApiServer:
        started = threading.Event()

        def serve() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            app = web.Application(client_max_size=64 << 20)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            self.loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            port = site._server.sockets[0].getsockname()[1]  # aiohttp has no public getter for the bound port
            self.url = f"http://127.0.0.1:{port}"
            started.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=serve, name="api-server", daemon=True)
        self._thread.start()
        started.wait(10)
        return self

    def stop(self) -> None:
        if self.loop is None:
            return

        async def shutdown() -> None:
            for watcher in self.watchers:
                watcher.queue.put_nowait(None)
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def call(self, coro_or_fn: Awaitable[T] | Callable[[], T]) -> T:
        """Run on the server's loop from another thread (tests), and wait for the result."""
        if asyncio.iscoroutine(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn, self.loop).result(30)

        async def wrapper() -> T:
            return coro_or_fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(30)

    def kubeconfig(self, path: Path, user: str = "test") -> Path:
        """A kubeconfig for this server; `user` is the bearer token, by which `calls` tells clients apart."""
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "test", "user": {"token": user}}],
                    "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "test"}}],
                    "current-context": "emulator",
                }
            )
        )
        return path

    # ------------------------------------------------------------------ store (runs on the loop)

    def resource(self, group: str, plural: str) -> Resource:
        try:
            return self.resources[(group, plural)]
        except KeyError:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource {plural}") from None

    def _emit(self, kind: str, res: Resource, obj: dict[str, Any]) -> None:
        snapshot = copy.deepcopy(obj)
        for watcher in list(self.watchers):
            if watcher.resource.key == res.key and watcher.wants(snapshot):
                watcher.queue.put_nowait({"type": kind, "object": snapshot})
        for subscriber in list(self.subscribers):
            subscriber(kind, res, snapshot)

    def _bump(self, obj: dict[str, Any]) -> None:
        self.rv = next(self._rv)
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def get(self, res: Resource, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self.objects[res.key].get((namespace if res.namespaced else None, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
        return obj

    def list(
        self, res: Resource, namespace: str | None = None, labels: str | None = None, fields: str | None = None
    ) -> list[dict[str, Any]]:
        terms = parse_selector(labels)
        return [
            o
            for (ns, _), o in sorted(self.objects[res.key].items(), key=lambda kv: (kv[0][0] or "", kv[0][1]))
            if (namespace is None or ns == namespace)
            and selector_matches(o["metadata"].get("labels") or {}, terms)
            and field_matches(o, fields)
        ]

    def create(self, res: Resource, namespace: str | None, body: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        if res.namespaced:
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        key = (meta.get("namespace") if res.namespaced else None, meta["name"])
        if key in self.objects[res.key]:
            raise ApiError(409, "AlreadyExists", f'{res.plural} "{meta["name"]}" already exists')
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_iso(), generation=1)
        obj.setdefault("apiVersion", res.group_version)
        obj.setdefault("kind", res.kind)
        if res.status:
            obj["status"] = {}
        self._bump(obj)
        self.objects[res.key][key] = obj
        self._emit("ADDED", res, obj)
        return obj

    def update(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        change: Callable[[dict], dict],
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """Apply `change` to a copy; keep the status subresource apart; bump versions only on a real change."""
        current = self.get(res, namespace, name)
        proposed = change(copy.deepcopy(current))
        if subresource == "status":
            merged = {**current, "status": proposed.get("status", {})}
        else:
            merged = {**proposed, "status": current.get("status")} if res.status else proposed
            if "status" in merged and merged["status"] is None:
                del merged["status"]
            for immutable in ("name", "namespace", "uid", "creationTimestamp"):
                if immutable in current["metadata"]:
                    merged["metadata"][immutable] = current["metadata"][immutable]
        merged["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if merged == current:
            return current
        spec_like = {k: v for k, v in merged.items() if k not in ("metadata", "status")}
        if spec_like != {k: v for k, v in current.items() if k not in ("metadata", "status")}:
            merged["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
        self._bump(merged)
        key = (namespace if res.namespaced else None, name)
        meta = merged["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not meta.get("deletionGracePeriodSeconds"):
            self.objects[res.key].pop(key, None)
            self._emit("DELETED", res, merged)
            self._collect_dependents(meta["uid"])
            return merged
        self.objects[res.key][key] = merged
        self._emit("MODIFIED", res, merged)
        return merged

    def delete(
        self, res: Resource, namespace: str | None, name: str, orphan: bool = False, graceful: bool = False
    ) -> dict[str, Any]:
        current = self.get(res, namespace, name)
        meta = current["metadata"]
        if graceful and (current.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            # A live pod's containers get SIGTERM; the pod stays, being deleted, until the kubelet has stopped
            # them (remove()). As in Kubernetes, where the kubelet's delete with grace period 0 ends it.
            if meta.get("deletionTimestamp"):
                return current
            grace = (current.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
            mark = {"metadata": {"deletionTimestamp": now_iso(), "deletionGracePeriodSeconds": grace}}
            return self.update(res, namespace, name, lambda o: merge_patch(o, mark))
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                return self.update(
                    res, namespace, name, lambda o: merge_patch(o, {"metadata": {"deletionTimestamp": now_iso()}})
                )
            return current
        self.objects[res.key].pop((namespace if res.namespaced else None, name))
        self._bump(current)
        self._emit("DELETED", res, current)
        if orphan:
            self._orphan_dependents(meta["uid"])
        else:
            self._collect_dependents(meta["uid"])
        return current

    def remove(self, res: Resource, namespace: str | None, name: str) -> None:
        """Finish a graceful deletion (what the kubelet does once a pod's containers are gone)."""
        obj = self.objects[res.key].pop((namespace if res.namespaced else None, name), None)
        if obj is not None:
            self._bump(obj)
            self._emit("DELETED", res, obj)
            self._collect_dependents(obj["metadata"]["uid"])

    def _dependents(self, uid: str) -> list[tuple[Resource, dict[str, Any]]]:
        return [
            (self.resources[key], obj)
            for key, objs in self.objects.items()
            for obj in list(objs.values())
            if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])
        ]

    def _collect_dependents(self, uid: str) -> None:
        """The garbage collector: dependents go with their owner (pods gracefully, as the kubelet stops them)."""
        for res, obj in self._dependents(uid):
            meta = obj["metadata"]
            with contextlib.suppress(ApiError):  # already gone
                self.delete(res, meta.get("namespace"), meta["name"], graceful=res.plural == "pods")

    def _orphan_dependents(self, uid: str) -> None:
        for res, obj in self._dependents(uid):
            refs = [r for r in obj["metadata"]["ownerReferences"] if r.get("uid") != uid]
            self.update(
                res,
                obj["metadata"].get("namespace"),
                obj["metadata"]["name"],
                lambda o, refs=refs: {**o, "metadata": {**o["metadata"], "ownerReferences": refs}},
            )

    # ------------------------------------------------------------------ HTTP

    def _discovery(self, path: str) -> dict[str, Any] | None:
        if path == "/version":
            return {"major": "1", "minor": "32", "gitVersion": "v1.32.0-emulator", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"]}
        groups = sorted({(r.group, r.version) for r in self.resources.values() if r.group})
        if path == "/apis":
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": g,
                        "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                        "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v},
                    }
                    for g, v in groups
                ],
            }
        m = re.fullmatch(r"/api/v1|/apis/([^/]+)/([^/]+)", path)
        if m:
            group, version = (m.group(1) or "", m.group(2) or "v1")
            items = []
            for r in self.resources.values():
                if r.group != group or r.version != version:
                    continue
                verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
                base = {
                    "name": r.plural,
                    "singularName": r.kind.lower(),
                    "namespaced": r.namespaced,
                    "kind": r.kind,
                    "verbs": verbs,
                    "shortNames": list(r.short_names),
                }
                items.append(base)
                if r.status:
                    status = {**base, "name": f"{r.plural}/status", "singularName": "", "shortNames": []}
                    items.append({**status, "verbs": ["get", "patch", "update"]})
            if not items:
                return None
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else "v1",
                "resources": items,
            }
        m = re.fullmatch(r"/apis/([^/]+)", path)
        if m and any(g == m.group(1) for g, _ in groups):
            version = next(v for g, v in groups if g == m.group(1))
            gv = {"groupVersion": f"{m.group(1)}/{version}", "version": version}
            return {
                "kind": "APIGroup",
                "apiVersion": "v1",
                "name": m.group(1),
                "versions": [gv],
                "preferredVersion": gv,
            }
        return None

    _PATH = re.compile(
        r"^/(?:api/(?P<cv>v1)|apis/(?P<g>[^/]+)/(?P<v>[^/]+))"
        r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$"
    )

    def fail(
        self, method: str, path: str, status: int = 500, times: int = 1, message: str = "injected by the test"
    ) -> None:
        """Answer the next `times` requests matching method and path (a regex) with an error."""
        self.faults.append([method, re.compile(path), status, times, message])

    _REASONS: ClassVar[dict[int, str]] = {
        400: "BadRequest",
        403: "Forbidden",
        404: "NotFound",
        409: "Conflict",
        422: "Invalid",
    }

    def _fault(self, request: web.Request) -> ApiError | None:
        for fault in self.faults:
            method, path, status, left, message = fault
            if left > 0 and request.method == method and path.search(request.path):
                fault[3] -= 1
                return ApiError(status, self._REASONS.get(status, "InternalError"), message)
        return None

    def made(self, user: str, method: str, pattern: str, status: int | None = None) -> list[Request]:
        """The requests `user` made with `method` on paths matching `pattern`, answered with `status`."""
        regex = re.compile(pattern)
        return [
            r
            for r in list(self.log)
            if r.user == user and r.method == method and regex.search(r.path) and status in (None, r.status)
        ]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        user = request.headers.get("Authorization", "").removeprefix("Bearer ")
        body = None
        if request.method in ("POST", "PATCH") and request.can_read_body:
            with contextlib.suppress(ValueError):
                body = await request.json()
        response = await self._answer(request, user)
        self.log.append(Request(user, request.method, request.path, response.status, body))
        return response

    async def _answer(self, request: web.Request, user: str) -> web.StreamResponse:
        self.requests[f"{request.method} {self._classify(request.path)}"] += 1
        if (call := self._verb(request)) is not None:
            self.calls[user].add(call)
        if (injected := self._fault(request)) is not None:
            return injected.response()
        try:
            if request.method == "GET" and (found := self._discovery(request.path)) is not None:
                return web.json_response(found)
            m = self._PATH.match(request.path)
            if not m:
                raise ApiError(404, "NotFound", f"no route for {request.path}")
            group = m.group("g") or ""
            plural, namespace, name, sub = m.group("plural"), m.group("ns"), m.group("name"), m.group("sub")
            if plural == "namespaces" and name is None and namespace:  # /api/v1/namespaces/<ns> (a Namespace)
                plural, name, namespace = "namespaces", namespace, None
            res = self.resource(group, plural)
            q = request.query
            if request.method == "GET" and name is None:
                if q.get("watch") in ("true", "1"):
                    return await self._watch(request, res, namespace)
                items = self.list(res, namespace, q.get("labelSelector"), q.get("fieldSelector"))
                if "as=Table" in request.headers.get("Accept", "") and res.columns:
                    return web.json_response(table(res, items, str(self.rv)))
                return web.json_response(
                    {
                        "kind": f"{res.kind}List",
                        "apiVersion": res.group_version,
                        "metadata": {"resourceVersion": str(self.rv)},
                        "items": items,
                    }
                )
            if request.method == "GET" and sub is None:
                found = self.get(res, namespace, name)
                if "as=Table" in request.headers.get("Accept", "") and res.columns:
                    return web.json_response(table(res, [found], str(self.rv)))
                return web.json_response(found)
            if request.method == "GET":
                return web.json_response(self.get(res, namespace, name))
            if request.method == "POST" and name is None:
                return web.json_response(self.create(res, namespace, await request.json()), status=201)
            if request.method == "PATCH":
                body = await request.json()
                kind = request.content_type
                if kind == "application/json-patch+json":
                    return web.json_response(self.update(res, namespace, name, lambda o: json_patch(o, body), sub))
                return web.json_response(self.update(res, namespace, name, lambda o: merge_patch(o, body), sub))
            if request.method == "PUT":
                body = await request.json()
                current = self.get(res, namespace, name)
                sent = body.get("metadata", {}).get("resourceVersion")
                if sent and sent != current["metadata"]["resourceVersion"]:
                    raise ApiError(
                        409,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    )
                return web.json_response(self.update(res, namespace, name, lambda o: body, sub))
            if request.method == "DELETE":
                options = {}
                if request.can_read_body:
                    try:
                        options = await request.json()
                    except ValueError:
                        options = {}
                policy = options.get("propagationPolicy") or q.get("propagationPolicy")
                gone = self.delete(res, namespace, name, orphan=policy == "Orphan", graceful=res.plural == "pods")
                return web.json_response(gone)
            raise ApiError(405, "MethodNotAllowed", f"{request.method} {request.path}")
        except ApiError as exc:
            return exc.response()

    def _verb(self, request: web.Request) -> tuple[str, str, str] | None:
        """The RBAC verb, group and resource of a request (None for discovery)."""
        m = self._PATH.match(request.path)
        if not m or self._discovery(request.path) is not None:
            return None
        plural, name, sub = m.group("plural"), m.group("name"), m.group("sub")
        if plural == "namespaces" and name is None and m.group("ns"):
            plural, name = "namespaces", m.group("ns")
        if request.method == "GET":
            verb = "get" if name else ("watch" if request.query.get("watch") in ("true", "1") else "list")
        else:
            verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[request.method]
        return verb, m.group("g") or "", f"{plural}/{sub}" if sub else plural

    @staticmethod
    def _classify(path: str) -> str:
        return re.sub(r"/namespaces/[^/]+", "/namespaces/*", path)

    async def _watch(self, request: web.Request, res: Resource, namespace: str | None) -> web.StreamResponse:
        q = request.query
        watcher = Watcher(res, namespace, parse_selector(q.get("labelSelector")), q.get("fieldSelector"))
        since = q.get("resourceVersion")
        initial = []
        if not since or since == "0" or q.get("sendInitialEvents") == "true":
            initial = [
                {"type": "ADDED", "object": copy.deepcopy(o)}
                for o in self.list(res, namespace, q.get("labelSelector"), q.get("fieldSelector"))
            ]
            if q.get("sendInitialEvents") == "true":
                initial.append(
                    {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": res.kind,
                            "apiVersion": res.group_version,
                            "metadata": {
                                "resourceVersion": str(self.rv),
                                "annotations": {"k8s.io/initial-events-end": "true"},
                            },
                        },
                    }
                )
        self.watchers.append(watcher)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        timeout = float(q.get("timeoutSeconds") or 3600)
        try:
            for event in initial:
                await response.write(json.dumps(event).encode() + b"\n")
            async for event in self._events(watcher, timeout):
                await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.remove(watcher)
        return response

    @staticmethod
    async def _events(watcher: Watcher, timeout: float) -> AsyncIterator[dict[str, Any]]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            try:
                event = await asyncio.wait_for(watcher.queue.get(), left)
            except asyncio.TimeoutError:
                return
            if event is None:
                return
            yield event
