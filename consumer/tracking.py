"""Request tracking: the status documents of §6 and the active Jobs behind `maxActiveJobs`.

The consumer records what it did with a message (applied, dead); executors report what the Jobs
then do (`JobEvents`). Both land here. A status write that fails is logged and never affects the
message: the objects in the cluster are what matter, the status is a report about them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from consumer import metrics
from consumer.backpressure import ActiveJobs
from consumer.executors.base import Applied, JobEvent
from gitfaas.logs import get_logger
from gitfaas.status import Claim, StatusStore, merge_documents, new_status, record_job_state, summarize

log = get_logger("gitfaas.consumer")


MAX_CHILDREN = 1000  # children listed in a request's status document; more are only counted
RetriesOf = Callable[[str], int]  # topic -> its `retries` in the configuration in use
Retry = Callable[[dict[str, Any]], Awaitable[None]]  # re-run the request of this status document


class RequestTracker:
    def __init__(self, store: StatusStore | None = None, *, retries_of: RetriesOf | None = None,
                 retry: Retry | None = None) -> None:
        self.store = store
        self.active_jobs = ActiveJobs()
        self.retries_of = retries_of or (lambda _topic: 0)
        self.retry = retry

    async def claim(self, request_id: str, *, topic: str, stream_seq: int, parent: str | None,
                    retry: int = 0) -> Claim:
        """Make the id this message's before anything of it is applied (see `StatusStore.claim`).

        `Claim.owner` is set when another stored message owns the id. A status store that cannot be
        reached claims nothing and refuses nothing: status is a report, the objects are what matter.
        """
        if self.store is None:
            return Claim()

        def create() -> dict[str, Any]:
            return {**new_status(request_id, topic, stream_seq, parent), "retry": retry}

        try:
            return await self.store.claim(request_id, stream_seq, create)
        except Exception as exc:  # noqa: BLE001 — see the docstring
            log.warning("request id not claimed", error=str(exc) or type(exc).__name__)
            return Claim()

    async def record(self, request_id: str, *, topic: str, stream_seq: int, attempts: int, parent: str | None,
                     state: str, commit: str | None = None, applied: list[Applied] | None = None,
                     error: str | None = None, retry: int = 0, claimed: Claim | None = None) -> None:
        """Write what the consumer did with a request, and list it under its parent."""
        if self.store is None:
            return

        def change(document: dict[str, Any]) -> None:
            document.update(topic=topic, stream_seq=stream_seq, parent=parent, state=state, attempts=attempts,
                            error=error, retry=retry)
            if commit is not None:
                document["commit"] = commit
            if applied is not None:
                # A dead request's documents were applied before the failure: they say so.
                merge_documents(document, [
                    {**a.as_dict(), "function_uid": a.function_uid,
                     "state": "applied" if state == "dead" else state, "reason": None}
                    for a in applied
                ])
                summarize(document)

        def adopt(document: dict[str, Any]) -> None:
            children = document.setdefault("children", [])
            if request_id in children:
                return
            if len(children) < MAX_CHILDREN:
                children.append(request_id)
            else:  # anyone may name a parent: a document that grows without end would stop being written
                document["children_omitted"] = int(document.get("children_omitted") or 0) + 1

        try:
            await self.store.update(request_id, change,
                                    create=lambda: new_status(request_id, topic, stream_seq, parent), known=claimed)
            if parent:  # lineage: list this request under its parent
                await self.store.update(parent, adopt)
        except Exception as exc:  # noqa: BLE001 — status is a report; the objects are what matter
            log.warning("status not recorded", error=str(exc) or type(exc).__name__)

    async def job_changed(self, event: JobEvent) -> bool:
        """An executor saw one of our Jobs change: free its `maxActiveJobs` slot, update its request.
        False when the status could not be written (the executor then keeps the Job's finalizer)."""
        if event.topic and event.kind == "Job":
            key = (event.namespace, event.name)
            if event.state in ("succeeded", "failed"):
                await self.active_jobs.finished(event.topic, key)
            elif event.state == "running":
                await self.active_jobs.started(event.topic, key)
        if self.store is None:
            return True

        rerun: list[bool] = []

        def change(document: dict[str, Any]) -> None:
            rerun.clear()  # the update may run this again after a concurrent write
            record_job_state(document, event.kind, event.namespace, event.name, event.state, event.reason)
            summarize(document)
            # A topic's `retries`: the first writer to see the failure claims the re-run, so several
            # consumer processes watching the same Job start it once.
            if document["state"] == "failed" and not document.get("rerun") and \
                    int(document.get("retry") or 0) < self.retries_of(document.get("topic") or ""):
                document["rerun"] = True
                rerun.append(True)

        try:
            # Created when the Job reports before the apply is recorded; `record` fills it in.
            document = await self.store.update(
                event.request_id, change, create=lambda: new_status(event.request_id, "", 0, None))
        except Exception as exc:  # noqa: BLE001 — a lost status update must not stop the executor
            log.warning("job status not recorded", job=event.name, error=str(exc) or type(exc).__name__)
            return False
        if document is not None and rerun and self.retry is not None:
            try:
                await self.retry(document)
            except Exception as exc:  # noqa: BLE001 — the failure stays recorded; an operator can replay
                log.error("automatic re-run not published", request_id=event.request_id,
                          error=str(exc) or type(exc).__name__)
        if document is not None:
            metrics.JOB_OUTCOMES.labels(document.get("topic", "?"), event.state).inc()
            log.info("job " + event.state, request_id=event.request_id, topic=document.get("topic"),
                     stream_seq=document.get("stream_seq"), job=event.name, reason=event.reason,
                     request_state=document["state"])
        return True
