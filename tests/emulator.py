"""
A Kubernetes API emulator for tests: kmock's ``KubernetesEmulator`` plus the gaps that matter to us.

Production code talks to it over real HTTP exactly as to a cluster (kubeconfig → kubernetes_asyncio →
``DynamicClient``), so everything the client relies on must look like a real API server. kmock 0.8 lacks:

* server-side apply (``PATCH`` with ``application/apply-patch+yaml``) creating absent objects;
* ``kind: <Kind>List`` / ``apiVersion`` on lists (the dynamic client raises ``KeyError: 'kind'``);
* ``labelSelector`` / ``fieldSelector`` on lists & watches;
* server-populated metadata (uid, resourceVersion, creationTimestamp, generation, namespace);
* a race-free watch start (kmock subscribes to its event bus only after replaying existing objects),
  ``watch=True`` as sent by kubernetes_asyncio (kmock knows only ``watch=true``), ``timeoutSeconds``;
* speed: kmock's DSL matching is O(recorded requests) per request (≈40 → 3 applies/s after a few hundred),
  so resource requests bypass it while no test-defined kmock reactions exist (``_DirectDispatch``);
* fault injection for robustness tests;
* ``pods/log`` (text a test gives with ``EmulatorHandle.add_pod``, ``tailLines`` honoured) and the
  background propagation of a Job's deletion to its pods (label ``job-name``), as the garbage
  collector does (``deletions`` records each deletion and its ``propagationPolicy``).

Apply semantics are "one field manager owns everything": the applied manifest replaces the object's
content (so removed labels disappear), while server-populated metadata and ``status`` are preserved.
Re-applying an identical manifest is a no-op (no resourceVersion bump, no watch event), as in a cluster.
Not emulated: managedFields/conflicts, dryRun, resourceVersion preconditions, JSON patches, and Namespace
objects themselves (kmock's path parser reads ``/api/v1/namespaces/x`` as a namespace, not an object).
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import re
import secrets
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.dynamic import DynamicClient

APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
TRUES = {"1", "t", "T", "true", "TRUE", "True"}
SERVER_METADATA = ("uid", "creationTimestamp", "generation", "resourceVersion", "namespace", "name")
REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
           410: "Expired", 422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
           503: "ServiceUnavailable", 504: "Timeout"}

Requirement = tuple[str, str, frozenset[str]]  # (key, op ∈ {in, notin, exists, !}, values)
_REQUIREMENT = re.compile(
    r"\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<val>[A-Za-z0-9_.-]*)|\s+(?P<setop>in|notin)\s*\((?P<vals>[^)]*)\))?\s*"
)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _resource(api_version: str, plural: str) -> kmock.resource:
    """kmock keys objects by ``kmock.resource(group, version, plural)``; core v1 has group ''."""
    group, _, version = api_version.rpartition("/")
    return kmock.resource(group, version, plural)


def _bad_request(message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=400, reason="BadRequest", message=message, details={})


def parse_selector(expr: str | None) -> list[Requirement]:
    """Parse a label/field selector (equality- and set-based) the way the API server reads it."""
    reqs: list[Requirement] = []
    for part in re.split(r",(?![^()]*\))", expr or ""):
        if not part.strip():
            continue
        m = _REQUIREMENT.fullmatch(part)
        if m is None or (m["neg"] and (m["op"] or m["setop"])):
            raise _bad_request(f"unable to parse requirement: {part!r}")
        if m["op"]:
            reqs.append((m["key"], "notin" if m["op"] == "!=" else "in", frozenset([m["val"]])))
        elif m["setop"]:
            reqs.append((m["key"], m["setop"], frozenset(v.strip() for v in m["vals"].split(","))))
        else:
            reqs.append((m["key"], "!" if m["neg"] else "exists", frozenset()))
    return reqs


def _satisfied(reqs: list[Requirement], values: Mapping[str, str]) -> bool:
    for key, op, vals in reqs:
        value = values.get(key)
        ok = {"in": value in vals, "notin": value not in vals,
              "exists": key in values, "!": key not in values}[op]
        if not ok:
            return False
    return True


def _field_values(obj: Mapping[str, Any], reqs: list[Requirement]) -> dict[str, str]:
    """Field selectors address dotted paths (``metadata.name``); only scalars are comparable."""
    values: dict[str, str] = {}
    for key, _, _ in reqs:
        node: Any = obj
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None and not isinstance(node, Mapping | list):
            values[key] = str(node).lower() if isinstance(node, bool) else str(node)
    return values


@dataclass
class Selector:
    """Label + field selectors of one list/watch request."""

    labels: list[Requirement]
    fields: list[Requirement]

    @classmethod
    def from_request(cls, request: kmock.Request) -> Selector:
        return cls(parse_selector(request.params.get("labelSelector")),
                   parse_selector(request.params.get("fieldSelector")))

    def __call__(self, obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return _satisfied(self.labels, labels) and _satisfied(self.fields, _field_values(obj, self.fields))


@dataclass
class Fault:
    """An injected failure: the next ``count`` matching requests (None: until removed) get ``status``."""

    status: int
    count: int | None = 1
    reason: str | None = None
    message: str | None = None
    method: str | None = "PATCH"  # None: any method
    plural: str | None = None  # None: any resource (discovery requests are failed only through `path`)
    retry_after: int | None = None
    delay: float = 0.0  # seconds the (simulated) server hangs before answering: a client timeout
    path: str | None = None  # a regex the URL path must match in full: any request, discovery included
    every: int = 1  # fail one in `every` matching requests, the first included (2: every other one)
    until: float | None = None  # the event loop's time after which the fault matches nothing
    details: dict[str, Any] | None = None  # the Status's `details` (e.g. `causes`)
    hits: int = 0  # requests failed
    passed: int = 0  # matching requests let through (`every` > 1)
    active: int = 0  # requests held by `delay` now
    most_active: int = 0  # the most held at once
    failed: list[str] = field(default_factory=list)  # "METHOD /path" of each failed request (the first 1000)

    def matches(self, request: kmock.Request) -> bool:
        if self.until is not None and asyncio.get_running_loop().time() > self.until:
            return False
        if self.method is not None and str(request.method.value).upper() != self.method.upper():
            return False
        if self.path is not None:
            return re.fullmatch(self.path, request.url.path) is not None
        resource = request.resource
        return bool(
            resource is not None and resource.plural is not None
            and (self.plural is None or resource.plural == self.plural)
        )

    def render(self) -> aiohttp.web.Response:
        reason = self.reason or REASONS.get(self.status, "InternalError")
        body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "code": self.status, "reason": reason, "details": self.details or {},
                "message": self.message or f"injected fault: {reason}"}
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return aiohttp.web.json_response(body, status=self.status, headers=headers)


class _DirectDispatch(kmock.RawHandler):
    """
    Serve resource requests by the emulator's own handlers, skipping kmock's DSL matching when possible.

    kmock matches a request against each reaction by re-filtering *all recorded requests* (O(N) per
    request), so a few hundred applies slow down to single-digit requests/s. With no user reactions
    registered, the outcome is the built-in fallback anyway. Sits below KubernetesEmulator in the MRO,
    so kmock's own state changes (create/delete) still run before it.
    """

    __slots__ = ()

    def _direct_handler(self, request: kmock.Request) -> Any:
        return None

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        handler = self._direct_handler(request)
        if handler is None:
            return await super()._handle(request)
        return await kmock.Response(payload=handler)(request)


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator, _DirectDispatch):
    """kmock's emulator with SSA, typed lists, selectors, server metadata, and fault injection."""

    faults: list[Fault] = attrs.field(factory=list)
    pod_logs: dict[tuple[str | None, str, str], str] = attrs.field(factory=dict)  # (ns, pod, container) -> text
    deletions: list[tuple[str, str | None, str, str | None]] = attrs.field(factory=list)  # (plural, ns, name, policy)
    require_field_manager: bool = True  # a real API server rejects apply without ?fieldManager= (422)
    apply_warnings: list[str] = attrs.field(factory=list)  # `Warning` headers on every apply answer
    _rv: int = attrs.field(default=0, init=False)
    _builtin_reactions: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._builtin_reactions = len(self._payloads)  # more means a test added its own kmock reactions
        with warnings.catch_warnings():  # kmock 0.8 uses the deprecated importlib.resources.read_binary
            warnings.simplefilter("ignore", DeprecationWarning)
            self.resources.load_bundled()  # discovery of built-in kinds (batch/v1 Job, v1 ConfigMap, …)

    # --- fault injection -------------------------------------------------------------------------------
    def fail_next(self, status: int, count: int | None = 1, *, reason: str | None = None,
                  message: str | None = None, method: str | None = "PATCH", plural: str | None = None,
                  retry_after: int | None = None, delay: float = 0.0, path: str | None = None,
                  every: int = 1, duration: float | None = None, details: dict[str, Any] | None = None) -> Fault:
        """Make the next ``count`` matching requests (None: all, until removed) answer ``status``.

        ``path`` matches any request by its URL path (discovery too); ``every=2`` fails every other
        matching request; ``duration`` ends the fault that many seconds from now.
        """
        until = None if duration is None else asyncio.get_running_loop().time() + duration
        fault = Fault(status, count, reason, message, method, plural, retry_after, delay, path, every, until, details)
        self.faults.append(fault)
        return fault

    def slow_next(self, delay: float, count: int | None = 1, **kwargs: Any) -> Fault:
        """The next ``count`` matching requests wait ``delay`` seconds, then are served as usual."""
        return self.fail_next(0, count, delay=delay, **kwargs)

    @contextlib.contextmanager
    def failing(self, status: int, **kwargs: Any) -> Iterator[Fault]:
        """Fail matching requests while inside the ``with`` block (the "flag is set" mode)."""
        fault = self.fail_next(status, None, **kwargs)
        try:
            yield fault
        finally:
            with contextlib.suppress(ValueError):
                self.faults.remove(fault)

    def _take_fault(self, request: kmock.Request) -> Fault | None:
        for fault in self.faults:
            if fault.matches(request):
                if (fault.hits + fault.passed) % fault.every:
                    fault.passed += 1
                    return None
                fault.hits += 1
                if len(fault.failed) < 1000:
                    fault.failed.append(f"{str(request.method.value).upper()} {request.url.path}")
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count <= 0:
                        self.faults.remove(fault)
                return fault
        return None

    # --- request handling ------------------------------------------------------------------------------
    def _direct_handler(self, request: kmock.Request) -> Any:
        if len(self._payloads) != self._builtin_reactions or request.resource is None:
            return None  # user reactions must get their chance
        if request.resource.plural is None:
            return None  # discovery: /api/v1, /apis/batch/v1 (few requests: clients cache discovery)
        return {
            kmock.action.LIST: self._serve_list, kmock.action.WATCH: self._serve_watch,
            kmock.action.FETCH: self._serve_fetch, kmock.action.CREATE: self._serve_create,
            kmock.action.UPDATE: self._serve_update, kmock.action.DELETE: self._serve_delete,
        }.get(request.action)  # type: ignore[call-overload]

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _kind(self, resource: kmock.resource) -> str:
        # NB: `self.resources[res]` would auto-create (and advertise) an empty entry; check first.
        kind = self.resources[resource].kind if resource in self.resources else None
        return kind or str(resource.plural).capitalize()

    @staticmethod
    def _is_apply(request: kmock.Request) -> bool:
        ctype = next((v for k, v in request.headers.items() if k.lower() == "content-type"), "")
        return ctype.split(";")[0].strip().lower() == APPLY_CONTENT_TYPE

    def _stamp_new(self, request: kmock.Request, body: Mapping[str, Any]) -> dict[str, Any]:
        """Fill what a real API server fills on creation (into a copy of the body)."""
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if request.namespace is not None:
            meta["namespace"] = request.namespace
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1,
                    resourceVersion=self._next_rv())
        return obj

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if (fault := self._take_fault(request)) is not None:
            if fault.delay:
                fault.active += 1
                fault.most_active = max(fault.most_active, fault.active)
                try:
                    await asyncio.sleep(fault.delay)  # a hung API server, not test synchronisation
                finally:
                    fault.active -= 1
            if fault.status:  # 0 (`slow_next`): a slow server, which then answers as usual
                return fault.render()
        if request.resource is not None and request.resource.plural == "pods" and request.subresource == "log":
            return await self._serve_pod_log(request)
        if request.resource is not None and request.action == kmock.action.DELETE and request.name:
            response = await super()._handle(request)
            await self._propagate_deletion(request)
            return response
        # kmock recognises only `watch=true`; kubernetes_asyncio sends `watch=True` (Go's ParseBool: both).
        if request.resource is not None and request.method == "GET" and request.params.get("watch") in TRUES:
            object.__setattr__(request, "action", kmock.action.WATCH)  # frozen; fixed for the record too
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(
                request.data, Mapping):
            # kmock stores request.data as the object. NB: kmock's filters match only the recorded request
            # objects (by id), so it is amended in place rather than replaced with an evolved copy.
            object.__setattr__(request, "data", self._stamp_new(request, request.data))
        if request.resource is not None and request.action == kmock.action.UPDATE and request.name:
            if self._is_apply(request):
                if request.params.get("dryRun"):  # checked, not stored: answer what would be
                    body = self._apply_body(request)
                    return aiohttp.web.json_response(body, headers=self._warning_headers())
                await self._apply(request)
                response = await _DirectDispatch._handle(self, request)
                for name, value in self._warning_headers():
                    response.headers.add(name, value)
                return response
            elif isinstance(request.data, Mapping):
                await self._merge(request)
            elif isinstance(request.data, list):
                await self._json_patch(request)
            else:
                return await super()._handle(request)
            # The state is changed; serve the response (fallback: the object) skipping kmock's mutation.
            return await _DirectDispatch._handle(self, request)
        return await super()._handle(request)

    def _warning_headers(self) -> list[tuple[str, str]]:
        quoted = [text.replace("\\", "\\\\").replace('"', '\\"') for text in self.apply_warnings]
        return [("Warning", f'299 - "{text}"') for text in quoted]  # quoted as RFC 7234 says

    async def _json_patch(self, request: kmock.Request) -> None:
        """RFC 6902 JSON patches (test, remove, add, replace), all or nothing, as the API server applies them."""
        assert request.resource is not None and request.name is not None
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                raise kmock.KubernetesObjectNotFoundError()
            obj = self.objects[key]
            new = copy.deepcopy(obj.raw)
            for op in request.data:
                parts = [p.replace("~1", "/").replace("~0", "~") for p in str(op.get("path", "")).split("/")[1:]]
                parent: Any = new
                try:
                    for part in parts[:-1]:
                        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
                    last: Any = int(parts[-1]) if isinstance(parent, list) and parts[-1] != "-" else parts[-1]
                    if op["op"] == "test" and parent[last] != op.get("value"):
                        raise kmock.KubernetesError(status=422, reason="Invalid", details={},
                                                    message=f"the server rejected our request: test failed at "
                                                            f"{op['path']}")
                    if op["op"] == "remove":
                        del parent[last]
                    elif op["op"] in ("add", "replace"):
                        if isinstance(parent, list) and op["op"] == "add":
                            parent.insert(len(parent) if last == "-" else last, op.get("value"))
                        else:
                            parent[last] = op.get("value")
                except (KeyError, IndexError, ValueError, TypeError):
                    raise kmock.KubernetesError(status=422, reason="Invalid", details={},
                                                message=f"the server rejected our request: no path {op.get('path')}"
                                                ) from None
            new.setdefault("metadata", {})["resourceVersion"] = self._next_rv()
            obj.history.append(new)
            await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})

    async def _serve_pod_log(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """``GET …/pods/<name>/log``: the text a test gave, as ``text/plain`` (``tailLines``, ``container``)."""
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return Fault(404, message=f'pods "{request.name}" not found').render()
        containers = [c.get("name") for c in (self.objects[key].raw.get("spec") or {}).get("containers") or []]
        container = request.params.get("container") or (containers[0] if containers else "")
        text = self.pod_logs.get((request.namespace, str(request.name), str(container)), "")
        tail = request.params.get("tailLines")
        if tail:
            text = "".join(line + "\n" for line in text.splitlines()[-int(tail):])
        return aiohttp.web.Response(text=text, content_type="text/plain")

    async def _propagate_deletion(self, request: kmock.Request) -> None:
        """A deleted Job's pods go too, unless the deletion said ``Orphan`` (the garbage collector's work)."""
        assert request.resource is not None
        data = request.data if isinstance(request.data, Mapping) else {}
        policy = request.params.get("propagationPolicy") or data.get("propagationPolicy")
        self.deletions.append((str(request.resource.plural), request.namespace, str(request.name), policy))
        if request.resource.plural != "jobs" or policy == "Orphan":
            return
        pods = _resource("v1", "pods")
        async with self._lock:
            for (resource, namespace, _name), obj in list(self.objects.items()):
                if resource != pods or namespace != request.namespace or obj.deleted:
                    continue  # (a deleted object has no raw form)
                if ((obj.raw.get("metadata") or {}).get("labels") or {}).get("job-name") == request.name:
                    obj.delete()
                    await self._buses[pods].put({"type": "DELETED", "object": obj.last.raw})

    async def _merge(self, request: kmock.Request) -> None:
        """Merge/strategic-merge patches: kmock's merge, plus resourceVersion & generation bumps."""
        assert request.resource is not None and request.name is not None
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                raise kmock.KubernetesObjectNotFoundError()
            obj = self.objects[key]
            old_spec = obj.raw.get("spec")  # not mutated by patch(): it makes a new version from a copy
            obj.patch(request.data)
            meta = dict(obj.raw.get("metadata") or {}, resourceVersion=self._next_rv())
            if obj.raw.get("spec") != old_spec:
                meta["generation"] = int(meta.get("generation", 1)) + 1
            obj.last["metadata"] = meta
            await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})

    def _apply_body(self, request: kmock.Request) -> dict[str, Any]:
        body = request.data
        if not isinstance(body, Mapping):  # a real YAML body (the client sends JSON, which kmock parses)
            try:
                body = yaml.safe_load(request.text)
            except yaml.YAMLError as e:
                raise _bad_request(f"error decoding YAML: {e}") from e
            object.__setattr__(request, "data", body)  # so that `emulator.requests[i].data` is the dict
        if not isinstance(body, Mapping):
            raise _bad_request("the apply body must be an object")
        if self.require_field_manager and not request.params.get("fieldManager"):
            raise kmock.KubernetesError(status=422, reason="Invalid", details={},
                                        message="fieldManager: Required value: is required for apply patch")
        if not body.get("apiVersion") or not body.get("kind"):
            raise _bad_request("invalid object: apiVersion and kind are required for apply patch")
        name = (body.get("metadata") or {}).get("name")
        if name and name != request.name:
            raise _bad_request(f"the name of the object ({name}) does not match the name on the URL")
        return copy.deepcopy(dict(body))

    async def _apply(self, request: kmock.Request) -> None:
        """Server-side apply: create if absent, else replace the content keeping server-owned fields."""
        assert request.resource is not None and request.name is not None
        body = self._apply_body(request)
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            obj = self.objects[key] if key in self.objects else None
            alive = obj is not None and not obj.deleted
            if request.subresource:  # e.g. /status: only that part of the object changes
                if obj is None or not alive:
                    raise kmock.KubernetesObjectNotFoundError()
                new = copy.deepcopy(obj.raw)
                new[request.subresource] = body.get(request.subresource, {})
            elif obj is None or not alive:
                new = self._stamp_new(request, body)
                new["metadata"]["name"] = request.name
            else:
                old, new = obj.raw, body
                new_meta = new.setdefault("metadata", {})
                new_meta.update({k: v for k, v in (old.get("metadata") or {}).items() if k in SERVER_METADATA})
                if "status" in old and "status" not in new:
                    new["status"] = copy.deepcopy(old["status"])
                if new.get("spec") != old.get("spec"):
                    new_meta["generation"] = int(new_meta.get("generation", 1)) + 1
            if obj is not None and alive:
                if new == obj.raw:
                    return  # no-op apply: no new resourceVersion, no watch event
                new["metadata"]["resourceVersion"] = self._next_rv()
            if obj is None:
                self.objects[key] = new
            else:
                obj.history.append(new)
            event = "MODIFIED" if alive else "ADDED"
            await self._buses[request.resource].put({"type": event, "object": self.objects[key].raw})

    # kmock finds a single object by scanning all objects; these are dict lookups by the same key.
    def _stored(self, request: kmock.Request) -> kmock.Object:
        data = request.data if isinstance(request.data, Mapping) else {}
        meta = (data.get("metadata") or {}) if request.action == kmock.action.CREATE else {}
        key = (request.resource, request.namespace or meta.get("namespace"), request.name or meta.get("name"))
        if key not in self.objects:
            raise kmock.KubernetesObjectNotFoundError()
        return self.objects[key]

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        obj = self._stored(request)
        if obj.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return obj.raw

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        return self._stored(request).last.raw

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        return self._stored(request).last.raw  # the last state even if just released & garbage-collected

    async def _serve_delete(self, request: kmock.Request) -> kmock.Payload:
        return self._stored(request).last.raw

    def _select(self, request: kmock.Request, selector: Selector) -> list[dict[str, Any]]:
        return [
            obj.raw for (resource, namespace, name), obj in self.objects.items()
            if resource == request.resource and not obj.deleted and request.name in (None, name)
            and (request.namespace is None or namespace == request.namespace) and selector(obj.raw)
        ]

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        selector = Selector.from_request(request)
        async with self._lock:
            items = self._select(request, selector)
        return {
            "apiVersion": _api_version(request.resource),
            "kind": f"{self._kind(request.resource)}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        """
        Replay matching objects as ADDED, then stream changes, honouring selectors & ``timeoutSeconds``.

        The bus is subscribed under the lock *before* the headers are sent, so any change made after
        the client sees the response is streamed (kmock subscribes late and can lose events). Objects
        entering/leaving the selection (e.g. relabelled) arrive as ADDED/DELETED, as from a real server.
        """
        assert request.resource is not None
        selector = Selector.from_request(request)  # raises 400 before the stream starts
        timeout = request.params.get("timeoutSeconds")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(timeout) if timeout else None
        bus = self._buses[request.resource]
        async with self._lock:
            marker = await bus.mark()
            initial = self._select(request, selector)
        try:
            yield b""  # send the headers now: the client is "connected" only once subscribed
            seen: set[tuple[str | None, str | None]] = set()
            for obj in initial:
                meta = obj.get("metadata") or {}
                seen.add((meta.get("namespace"), meta.get("name")))
                yield {"type": "ADDED", "object": obj}
            stream = aiter(bus.stream(since=marker))
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await anext(stream)
                except TimeoutError:
                    return
                obj = event["object"]
                meta = obj.get("metadata") or {}
                if request.namespace not in (None, meta.get("namespace")):
                    continue
                if request.name not in (None, meta.get("name")):
                    continue
                key, matches = (meta.get("namespace"), meta.get("name")), selector(obj)
                if event["type"] == "DELETED" or not matches:
                    if key in seen:
                        seen.discard(key)
                        yield {"type": "DELETED", "object": obj}
                else:
                    yield {"type": "MODIFIED" if key in seen else "ADDED", "object": obj}
                    seen.add(key)
        finally:
            with contextlib.suppress(ValueError):
                await bus.unmark(marker)

    # --- direct state manipulation (for tests playing the role of controllers) -------------------------
    async def set_status(self, api_version: str, plural: str, namespace: str | None, name: str,
                         status: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``status`` into an object as a controller would, with a MODIFIED watch event."""
        resource = _resource(api_version, plural)
        key = (resource, namespace, name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                raise LookupError(f"no {plural} {namespace}/{name} in the emulator")
            obj = self.objects[key]
            obj.patch({"status": dict(status), "metadata": {"resourceVersion": self._next_rv()}})
            await self._buses[resource].put({"type": "MODIFIED", "object": obj.raw})
            return copy.deepcopy(obj.raw)


def _api_version(resource: kmock.resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


def job_status(condition: str | None = "Complete", *, reason: str | None = None, message: str | None = None,
               **fields: Any) -> dict[str, Any]:
    """A Job status as the Job controller (k8s ≥1.31) writes it: a *Target/*Met condition first."""
    now = _now()
    status: dict[str, Any] = {"startTime": now, **fields}
    if condition is None:
        return status
    preceding = {"Complete": ("SuccessCriteriaMet", "CompletionsReached"),
                 "Failed": ("FailureTarget", "BackoffLimitExceeded")}.get(condition)
    reason = reason or (preceding[1] if preceding else condition)
    conditions = [{"type": t, "status": "True", "reason": reason, "message": message or reason,
                   "lastProbeTime": now, "lastTransitionTime": now}
                  for t in ([preceding[0]] if preceding else []) + [condition]]
    status["conditions"] = conditions
    if condition == "Complete":
        status.setdefault("succeeded", 1)
        status.setdefault("completionTime", now)
    elif condition == "Failed":
        status.setdefault("failed", 1)
    return status


@dataclass
class EmulatorHandle:
    """A running emulator with its URL and kubeconfig; the helpers hide kmock's key types."""

    emulator: Emulator
    url: str
    kubeconfig: Path
    discovery_cache: Path  # pass as DynamicClient(cache_file=...) to avoid stale per-host caches

    def objects(self, api_version: str, kind_plural: str,
                namespace: str | None = None) -> list[dict[str, Any]]:
        """Current (non-deleted) objects, as deep copies, e.g. ``objects("batch/v1", "jobs")``."""
        resource = _resource(api_version, kind_plural)
        return [
            copy.deepcopy(obj.raw) for (res, ns, _), obj in self.emulator.objects.items()
            if res == resource and not obj.deleted and (namespace is None or ns == namespace)
        ]

    def jobs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.objects("batch/v1", "jobs", namespace)

    async def set_job_status(self, name: str, namespace: str = "default", *,
                             condition: str | None = "Complete", reason: str | None = None,
                             message: str | None = None, **fields: Any) -> dict[str, Any]:
        """Act as the Job controller: set ``status`` (conditions etc.), emitting a MODIFIED event."""
        status = job_status(condition, reason=reason, message=message, **fields)
        return await self.emulator.set_status("batch/v1", "jobs", namespace, name, status)

    async def add_pod(self, job_name: str, logs: str | Mapping[str, str] = "", namespace: str = "default",
                      name: str | None = None) -> dict[str, Any]:
        """Act as the Job controller: a pod of the Job (label ``job-name``), whose containers printed ``logs``
        (one text, or one per container name)."""
        texts = {"main": logs} if isinstance(logs, str) else dict(logs)
        name = name or f"{job_name}-{secrets.token_hex(3)[:5]}"
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {"job-name": job_name, "batch.kubernetes.io/job-name": job_name}},
                "spec": {"restartPolicy": "Never", "containers": [{"name": c, "image": "busybox"} for c in texts]}}
        async with self.api_client() as api:
            created = await k8s_client.CoreV1Api(api).create_namespaced_pod(namespace, body)
        for container, text in texts.items():
            self.emulator.pod_logs[(namespace, name, container)] = text
        return created.to_dict()

    @contextlib.asynccontextmanager
    async def api_client(self) -> AsyncIterator[k8s_client.ApiClient]:
        """An ApiClient built from the kubeconfig, without touching the global default configuration."""
        configuration = k8s_client.Configuration()
        await k8s_config.load_kube_config(config_file=str(self.kubeconfig),
                                          client_configuration=configuration)
        async with k8s_client.ApiClient(configuration) as api:
            yield api

    @contextlib.asynccontextmanager
    async def dynamic_client(self) -> AsyncIterator[DynamicClient]:
        async with self.api_client() as api:
            yield await DynamicClient(api, cache_file=str(self.discovery_cache))


@contextlib.asynccontextmanager
async def running_emulator(tmp_path: Path) -> AsyncIterator[EmulatorHandle]:
    """Starts Emulator + kmock.Server on 127.0.0.1 (free port), writes a kubeconfig file for it."""
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        url = f"http://{server.host}:{server.port}"
        stem = f"emulator-{server.port}-{uuid.uuid4().hex[:8]}"  # unique even when ports get reused
        kubeconfig = tmp_path / f"{stem}.kubeconfig"
        kubeconfig.write_text(json.dumps({  # JSON is YAML
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "kmock", "cluster": {"server": url}}],
            "users": [{"name": "kmock", "user": {}}],
            "contexts": [{"name": "kmock",
                          "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
            "current-context": "kmock",
        }, indent=2))
        yield EmulatorHandle(emulator, url, kubeconfig, tmp_path / f"{stem}.discovery.json")
