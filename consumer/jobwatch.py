"""Following the Jobs gitfaas created, so a request's status says how its Jobs ended (§10).

One list-then-watch per namespace with the label selector `app.kubernetes.io/managed-by=gitfaas`
(no polling per Job). A watch that ends is resumed from its last resourceVersion; one that is
too old (410 Gone) starts again with a fresh list, whose terminal Jobs are reported again —
reports are idempotent, so a restart never loses an outcome.

Outcomes survive the Job (issue 14): the executor applies every Job with the finalizer
`gitfaas.io/outcome`, so a Job deleted by `ttlSecondsAfterFinished`, by hand or with its namespace
stays (marked for deletion) until a consumer has *stored* its outcome; only then is the finalizer
removed (a JSON patch that tests the entry first, so no other finalizer is touched). A consumer
that is down only delays this.

Blocked Jobs are explained: a second list-then-watch per namespace follows the Job controller's
`FailedCreate` events (Pod Security, a quota, a missing ServiceAccount…) and puts their message
into the Job's `reason` while it has no pod.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from kubernetes_asyncio.client import ApiClient, BatchV1Api, CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.watch import Watch

from consumer.apierrors import fold
from consumer.executors.base import JobEvent, JobEvents
from consumer.prepare import ANNOTATION_REQUEST_ID, ANNOTATION_TOPIC, MANAGED_BY
from gitfaas import fast
from gitfaas.logs import get_logger

log = get_logger("gitfaas.jobwatch")

SELECTOR = f"{MANAGED_BY}=gitfaas"
FINALIZER = "gitfaas.io/outcome"
EVENT_SELECTOR = "involvedObject.kind=Job,reason=FailedCreate"
TERMINAL = ("succeeded", "failed")
DELETED_REASON = "Deleted: the Job was deleted before it finished"


class _RawWatch(Watch):
    """Events as plain dicts: building `V1Job` models we never read cost ~200 µs an event (bench B2)."""

    def get_return_type(self, func: Any) -> None:
        return None

    def unmarshal_event(self, data: str | bytes, response_type: Any) -> Any:
        """kubernetes_asyncio's own, for the usual events read with orjson (a Job event is ~4 KB: ~2% of the
        consumer's CPU went to `json.loads`, bench B2). Errors, bookmarks and anything odd: the library's."""
        try:
            event = fast.loads_trusted(data)
        except ValueError:
            return super().unmarshal_event(data, response_type)
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if response_type is not None or kind not in ("ADDED", "MODIFIED", "DELETED") or not isinstance(obj, dict):
            return super().unmarshal_event(data, response_type)
        event["raw_object"] = obj
        metadata = obj.get("metadata")
        if isinstance(metadata, dict) and "resourceVersion" in metadata:
            self.resource_version = metadata["resourceVersion"]
        return event


WATCH_SECONDS = 300
RETRY_SECONDS = 2.0
MAX_REMEMBERED = 20_000
UNREPORTED_RETRY_SECONDS = 5.0


def job_state(job: dict[str, Any]) -> tuple[str, str | None]:
    """The state of a Job as its controller reports it in `status`."""
    status = job.get("status") or {}
    conditions = [c for c in status.get("conditions") or [] if c.get("status") == "True"]
    for condition in conditions:
        if condition.get("type") == "Complete":
            return "succeeded", None
    for condition in conditions:
        if condition.get("type") == "Failed":
            reason = condition.get("reason") or "Failed"
            message = condition.get("message")
            return "failed", f"{reason}: {message}" if message else reason
    if status.get("active") or status.get("startTime"):
        return "running", None
    return "applied", None


class JobWatcher:
    def __init__(self, api: ApiClient, namespaces: frozenset[str], events: JobEvents,
                 request_timeout: float = 15.0) -> None:
        self._batch = BatchV1Api(api)
        self._core = CoreV1Api(api)
        self._namespaces = sorted(namespaces)
        self._events = events
        self._timeout = request_timeout
        self._seen: dict[tuple[str, str], tuple[str, str | None]] = {}  # (namespace, name) -> last report
        self._blocked: dict[tuple[str, str], str] = {}  # FailedCreate reason of Jobs that have no pod
        self._unreported: dict[tuple[str, str], dict[str, Any]] = {}  # terminal Jobs whose report failed
        self._listed: set[str] = set()  # namespaces listed at least once
        self.listed = asyncio.Event()  # every namespace listed once: `exists` can be asked
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow(ns), name=f"jobwatch-{ns}") for ns in self._namespaces]
        self._tasks += [asyncio.create_task(self._follow_events(ns), name=f"jobwatch-events-{ns}")
                        for ns in self._namespaces]
        self._tasks.append(asyncio.create_task(self._retry_unreported(), name="jobwatch-retry"))

    async def stop(self, timeout: float = 2.0) -> None:
        """Cancel the watches; do not wait on a server that keeps a cancelled stream open (seen
        with a watch that was being re-established while we stopped). Finalizers stay: a Job that
        ends meanwhile keeps its outcome until a consumer runs again."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=timeout)
            if pending:
                log.warning("job watch still closing at shutdown", namespaces=self._namespaces)
        self._tasks = []

    async def _get(self, namespace: str, name: str, body: bool) -> tuple[int, bytes]:
        """One Job `get`: the answer's status, and its body when asked for and 200."""
        response = await self._batch.read_namespaced_job(name, namespace, _preload_content=False,
                                                         _request_timeout=self._timeout)
        async with response:
            return response.status, await response.read() if body and response.status == 200 else b""

    async def exists(self, namespace: str, name: str) -> bool | None:
        """Whether the API server has this Job now; None when it cannot tell."""
        try:
            status, _ = await self._get(namespace, name, body=False)
        except Exception:  # noqa: BLE001 — "cannot tell" is an answer
            return None
        return {200: True, 404: False}.get(status)

    async def _read(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Job as the API server has it now; None when it is gone or cannot be read."""
        if not namespace or not name:
            return None
        try:
            status, payload = await self._get(namespace, name, body=True)
            job = json.loads(payload) if status == 200 else None
        except Exception as exc:  # noqa: BLE001 — the next event or the watch tells again
            log.warning("job not read", job=name, namespace=namespace, error=str(exc) or type(exc).__name__)
            return None
        return job if isinstance(job, dict) else None

    async def _follow(self, namespace: str) -> None:
        while True:
            try:
                version = await self._list(namespace)
                if namespace not in self._listed:
                    self._listed.add(namespace)
                    if self._listed.issuperset(self._namespaces):
                        self.listed.set()
                while version is not None:
                    version = await self._watch(namespace, version)
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status != 410:
                    log.warning("job watch failed, starting again", namespace=namespace, status=exc.status,
                                reason=exc.reason)
                    await asyncio.sleep(RETRY_SECONDS)
            except Exception as exc:  # noqa: BLE001 — the watch must outlive a bad connection
                log.warning("job watch failed, starting again", namespace=namespace,
                            error=str(exc) or type(exc).__name__)
                await asyncio.sleep(RETRY_SECONDS)

    async def _list(self, namespace: str) -> str:
        response = await self._batch.list_namespaced_job(namespace, label_selector=SELECTOR,
                                                         _preload_content=False)
        async with response:
            if not 200 <= response.status <= 299:  # not checked by the client without preloading
                raise ApiException(status=response.status, reason=(await response.text())[:300])
            listing = json.loads(await response.read())
        for job in listing.get("items") or []:
            await self._observe(job)
        return str((listing.get("metadata") or {}).get("resourceVersion") or "")

    async def _watch(self, namespace: str, version: str) -> str | None:
        """Follow changes until the server ends the watch; returns where to resume."""
        watch = _RawWatch()
        async with watch.stream(self._batch.list_namespaced_job, namespace, label_selector=SELECTOR,
                                resource_version=version or None, timeout_seconds=WATCH_SECONDS,
                                allow_watch_bookmarks=True) as stream:
            async for event in stream:
                if event.get("type") in ("ADDED", "MODIFIED"):
                    await self._observe(event["raw_object"])
                elif event.get("type") == "DELETED":
                    await self._deleted(event["raw_object"])
        return watch.resource_version or version

    # ---- FailedCreate events: why a Job has no pod ----------------------------------------------

    async def _follow_events(self, namespace: str) -> None:
        while True:
            try:
                response = await self._core.list_namespaced_event(namespace, field_selector=EVENT_SELECTOR,
                                                                  _preload_content=False)
                async with response:
                    if not 200 <= response.status <= 299:
                        raise ApiException(status=response.status, reason=(await response.text())[:300])
                    listing = json.loads(await response.read())
                for event in listing.get("items") or []:
                    await self._failed_create(event)
                version = str((listing.get("metadata") or {}).get("resourceVersion") or "")
                while version:
                    watch = _RawWatch()
                    async with watch.stream(self._core.list_namespaced_event, namespace,
                                            field_selector=EVENT_SELECTOR, resource_version=version,
                                            timeout_seconds=WATCH_SECONDS, allow_watch_bookmarks=True) as stream:
                        async for event in stream:
                            if event.get("type") in ("ADDED", "MODIFIED"):
                                await self._failed_create(event["raw_object"])
                    version = watch.resource_version or version
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status != 410:
                    log.warning("job event watch failed, starting again", namespace=namespace, status=exc.status,
                                reason=exc.reason)
                    await asyncio.sleep(RETRY_SECONDS * 5)
            except Exception as exc:  # noqa: BLE001 — the watch must outlive a bad connection
                log.warning("job event watch failed, starting again", namespace=namespace,
                            error=str(exc) or type(exc).__name__)
                await asyncio.sleep(RETRY_SECONDS * 5)

    async def _failed_create(self, event: dict[str, Any]) -> None:
        involved = event.get("involvedObject") or {}
        key = (involved.get("namespace") or "", involved.get("name") or "")
        reason = f"{event.get('reason') or 'FailedCreate'}: {fold(str(event.get('message') or ''), 400)}"
        if self._blocked.get(key) == reason:
            return
        self._blocked[key] = reason
        if len(self._blocked) > MAX_REMEMBERED:
            del self._blocked[next(iter(self._blocked))]
        # The Job is read when such an event comes (rare), rather than every open Job kept in memory: that
        # cost ~3.6 KB per running Job (B4 grew 36 MiB per 10,000 Jobs that never finish).
        job = await self._read(*key)
        if job is not None:
            await self._observe(job)

    # ---- reporting ------------------------------------------------------------------------------

    async def _deleted(self, job: dict[str, Any]) -> None:
        """A Job removed before it ended counts as failed (it will not finish now). With our finalizer
        this was reported when the deletion began; this is for Jobs applied without it."""
        meta = job.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        last = self._seen.pop(key, (None, None))[0]
        self._blocked.pop(key, None)
        self._unreported.pop(key, None)
        if last in TERMINAL or job_state(job)[0] in TERMINAL:
            return
        await self._report(job, "failed", DELETED_REASON)

    async def _observe(self, job: dict[str, Any]) -> None:
        meta = job.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        state, reason = job_state(job)
        if state not in TERMINAL and meta.get("deletionTimestamp"):
            state, reason = "failed", DELETED_REASON  # it will not finish now
        if state in TERMINAL:
            self._blocked.pop(key, None)
        else:
            if (job.get("status") or {}).get("active"):
                self._blocked.pop(key, None)  # it has pods now
            elif key in self._blocked:
                reason = self._blocked[key]
        if (state == "applied" and reason is None) or self._seen.get(key) == (state, reason):
            if state in TERMINAL and FINALIZER in (meta.get("finalizers") or []):
                await self._release(job)
            return
        if reason is not None and state not in TERMINAL:
            log.warning("job cannot create its pods", job=key[1], namespace=key[0], reason=reason)
        if await self._report(job, state, reason) is False:
            if state in TERMINAL:
                self._unreported[key] = job  # the finalizer stays; tried again shortly
            return
        self._unreported.pop(key, None)
        self._seen[key] = (state, reason)
        if len(self._seen) > MAX_REMEMBERED:  # forget the oldest: at worst it is reported again
            del self._seen[next(iter(self._seen))]
        if state in TERMINAL and FINALIZER in (meta.get("finalizers") or []):
            await self._release(job)

    async def _retry_unreported(self) -> None:
        while True:
            await asyncio.sleep(UNREPORTED_RETRY_SECONDS)
            for key, job in list(self._unreported.items()):
                self._unreported.pop(key, None)
                await self._observe(job)

    async def _release(self, job: dict[str, Any], attempts: int = 3) -> None:
        """Remove our finalizer (the outcome is stored): a JSON patch that first tests the entry is ours,
        so the other finalizers and a concurrent change are never overwritten."""
        meta = job.get("metadata") or {}
        namespace, name = meta.get("namespace") or "", meta.get("name") or ""
        finalizers = list(meta.get("finalizers") or [])
        for _ in range(attempts):
            if FINALIZER not in finalizers:
                return
            index = finalizers.index(FINALIZER)
            patch = [{"op": "test", "path": f"/metadata/finalizers/{index}", "value": FINALIZER},
                     {"op": "remove", "path": f"/metadata/finalizers/{index}"}]
            try:
                response = await self._batch.patch_namespaced_job(name, namespace, patch, _preload_content=False,
                                                                  _request_timeout=self._timeout)
                async with response:
                    status, payload = response.status, await response.read()
            except Exception as exc:  # noqa: BLE001 — kept; tried again shortly
                log.warning("job finalizer not removed, trying again", job=name, error=str(exc) or type(exc).__name__)
                self._unreported[(namespace, name)] = job
                return
            if 200 <= status <= 299 or status == 404:
                return
            if status not in (409, 422):  # 422: the test failed, the list changed meanwhile
                log.warning("job finalizer not removed, trying again", job=name, status=status,
                            error=payload[:200].decode(errors="replace"))
                self._unreported[(namespace, name)] = job  # e.g. 429: tried again shortly
                return
            try:
                response = await self._batch.read_namespaced_job(name, namespace, _preload_content=False,
                                                                 _request_timeout=self._timeout)
                async with response:
                    if response.status == 404:
                        return
                    finalizers = list(((json.loads(await response.read()).get("metadata") or {})
                                       .get("finalizers")) or [])
            except Exception as exc:  # noqa: BLE001
                log.warning("job finalizer not removed", job=name, error=str(exc) or type(exc).__name__)
                return

    async def _report(self, job: dict[str, Any], state: str, reason: str | None) -> bool:
        """Tell the consumer; False when the outcome could not be stored."""
        meta = job.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        annotations = meta.get("annotations") or {}
        request_id = annotations.get(ANNOTATION_REQUEST_ID)
        if not request_id:
            return True
        try:
            stored = await self._events.job_changed(JobEvent(
                request_id=request_id, kind="Job", namespace=key[0], name=key[1], state=state, reason=reason,
                topic=annotations.get(ANNOTATION_TOPIC)))
        except Exception as exc:  # noqa: BLE001 — one lost report must not stop the watch
            log.warning("job event not delivered", job=key[1], error=str(exc) or type(exc).__name__)
            return False
        return stored is not False
