"""Following the Jobs gitfaas created, so a request's status says how its Jobs ended (§10).

One list-then-watch per namespace with the label selector `app.kubernetes.io/managed-by=gitfaas`
(no polling per Job). A watch that ends is resumed from its last resourceVersion; one that is
too old (410 Gone) starts again with a fresh list, whose terminal Jobs are reported again —
reports are idempotent, so a restart never loses an outcome.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from kubernetes_asyncio.client import ApiClient, BatchV1Api
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.watch import Watch

from consumer.executors.base import JobEvent, JobEvents
from consumer.prepare import ANNOTATION_REQUEST_ID, ANNOTATION_TOPIC, MANAGED_BY
from gitfaas.logs import get_logger

log = get_logger("gitfaas.jobwatch")

SELECTOR = f"{MANAGED_BY}=gitfaas"


class _RawWatch(Watch):
    """Events as plain dicts: building `V1Job` models we never read cost ~200 µs an event (bench B2)."""

    def get_return_type(self, func: Any) -> None:
        return None
WATCH_SECONDS = 300
RETRY_SECONDS = 2.0
MAX_REMEMBERED = 20_000


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
    def __init__(self, api: ApiClient, namespaces: frozenset[str], events: JobEvents) -> None:
        self._batch = BatchV1Api(api)
        self._namespaces = sorted(namespaces)
        self._events = events
        self._seen: dict[tuple[str, str], str] = {}  # (namespace, name) -> last state reported
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow(ns), name=f"jobwatch-{ns}") for ns in self._namespaces]

    async def stop(self, timeout: float = 2.0) -> None:
        """Cancel the watches; do not wait on a server that keeps a cancelled stream open (seen
        with a watch that was being re-established while we stopped)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=timeout)
            if pending:
                log.warning("job watch still closing at shutdown", namespaces=self._namespaces)
        self._tasks = []

    async def _follow(self, namespace: str) -> None:
        while True:
            try:
                version = await self._list(namespace)
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

    async def _deleted(self, job: dict[str, Any]) -> None:
        """A Job removed before it ended counts as failed (it will not finish now)."""
        meta = job.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        last = self._seen.pop(key, None)
        if last in ("succeeded", "failed") or job_state(job)[0] in ("succeeded", "failed"):
            return
        await self._report(job, "failed", "Deleted: the Job was deleted before it finished")

    async def _observe(self, job: dict[str, Any]) -> None:
        meta = job.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        state, reason = job_state(job)
        if state == "applied" or self._seen.get(key) == state:
            return
        self._seen[key] = state
        if len(self._seen) > MAX_REMEMBERED:  # forget the oldest: at worst it is reported again
            del self._seen[next(iter(self._seen))]
        await self._report(job, state, reason)

    async def _report(self, job: dict[str, Any], state: str, reason: str | None) -> None:
        meta = job.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        annotations = meta.get("annotations") or {}
        request_id = annotations.get(ANNOTATION_REQUEST_ID)
        if not request_id:
            return
        try:
            await self._events.job_changed(JobEvent(
                request_id=request_id, kind="Job", namespace=key[0], name=key[1], state=state, reason=reason,
                topic=annotations.get(ANNOTATION_TOPIC)))
        except Exception as exc:  # noqa: BLE001 — one lost report must not stop the watch
            log.warning("job event not delivered", job=key[1], error=str(exc) or type(exc).__name__)
