"""Requests whose Jobs are gone without an outcome become `unknown` (issue 14).

With gitfaas's finalizer a Job cannot disappear before its outcome is stored, so this only finds
what the finalizer could not protect: Jobs applied by a gitfaas without it, or whose finalizer was
removed by hand (the uninstall step in the README) while no consumer ran. Once the executor's Job
watch has listed every namespace, the status bucket is read once: each request still `applied` or
`running` whose Job the API server says does not exist (a `get` answering 404, so a Job applied
meanwhile is never taken for lost) gets that Job marked `unknown` with the reason, and the request
with it — instead of staying `applied` or `running` for ever.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from nats.errors import TimeoutError as NatsTimeoutError

from consumer.executors.base import JobEvent
from consumer.tracking import RequestTracker
from gitfaas.logs import get_logger

log = get_logger("gitfaas.consumer")

OPEN = ("applied", "running")
LOST_REASON = ("Lost: the Job no longer exists and its outcome was never recorded (it was removed while no "
               "gitfaas consumer was watching, without gitfaas's finalizer)")
SCAN_TIMEOUT_SECONDS = 30.0


class Watching(Protocol):
    """What the Job watch offers (`consumer.jobwatch.JobWatcher`)."""

    @property
    def namespaces(self) -> list[str]: ...

    async def exists(self, namespace: str, name: str) -> bool | None: ...


async def open_jobs(tracker: RequestTracker, namespaces: set[str]) -> list[tuple[str, str | None, str, str]]:
    """(request id, topic, namespace, Job name) of every Job whose request is still applied or running."""
    store = tracker.store
    if store is None:
        return []
    found: list[tuple[str, str | None, str, str]] = []
    watcher = await store.kv.watchall(ignore_deletes=True)
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=SCAN_TIMEOUT_SECONDS)
            except NatsTimeoutError:
                break
            if entry is None:  # every current value has been read
                break
            if not entry.value:
                continue
            try:
                document: Any = json.loads(entry.value)
            except ValueError:
                continue
            if not isinstance(document, dict) or document.get("state") not in OPEN:
                continue
            for item in document.get("documents") or []:
                if isinstance(item, dict) and item.get("kind") == "Job" and item.get("state") in OPEN \
                        and item.get("namespace") in namespaces and item.get("name"):
                    found.append((str(document.get("request_id") or entry.key), document.get("topic"),
                                  item["namespace"], item["name"]))
    finally:
        await watcher.stop()
    return found


async def mark_lost_jobs(tracker: RequestTracker, watch: Watching) -> int:
    """Mark the Jobs that are gone without an outcome `unknown`; returns how many."""
    lost = 0
    for request_id, topic, namespace, name in await open_jobs(tracker, set(watch.namespaces)):
        if await watch.exists(namespace, name) is not False:
            continue
        await tracker.job_changed(JobEvent(request_id=request_id, kind="Job", namespace=namespace, name=name,
                                           state="unknown", reason=LOST_REASON, topic=topic))
        log.warning("job outcome lost", request_id=request_id, job=name, namespace=namespace)
        lost += 1
    return lost
