"""The consumer's side of runs (§11): timestamps and `root` on every status document, the run index
kept in step with its requests, cancellation, and the Jobs' output on request.

`RunAwareStore` is the status store the request tracker writes through: every write of a status
document is stamped (`published_at`, `applied_at`, `started_at`, `finished_at`, `root`), keeps a
cancelled request cancelled, and — when the request's outcome changed — updates its run's entry
(`RunBook.note`). The run index is therefore written only when a request appears or finishes: one
write per message in the usual case (bench B2).

**A run is not finished while a child published by one of its Jobs has not been handled.** A Job
may publish the next topic and exit at once: its message is stored in the stream (the bridge answers
202 only then) before the Job ends, so before its end is observed. When every known request of a
run has finished, `RunBook` therefore looks at the stream messages the durable consumer has not yet
acknowledged, up to the stream's last sequence at that moment: one carrying `Gitfaas-Parent` of a
request of the run, and not yet in it, keeps the run `running` (`unhandled_children`), until that
child is handled — which adds it to the run. Past `SETTLE_SCAN_LIMIT` such messages the run waits,
and is looked at again every second, until the durable consumer's ack floor passes that sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Protocol

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from consumer.executors.base import JobEvent, JobEvents
from gitfaas.jspublish import PipelinedKeyValue
from gitfaas.logs import get_logger
from gitfaas.message import request_id_of
from gitfaas.runs import (
    CANCELLED_ERROR,
    FINAL_REQUEST_STATES,
    RunStore,
    all_done,
    direct_batch,
    entry_of,
    evaluate,
    is_request_finished,
    new_run,
    rfc3339,
    set_entry,
    utc_now,
)
from gitfaas.settings import Settings
from gitfaas.status import Claim, StatusStore
from gitfaas.subjects import HEADER_PARENT, REQUESTS_BUCKET

log = get_logger("gitfaas.runs")

# When the message being handled was published (its `Gitfaas-Published-At`, else the time JetStream
# stored it): set by the consumer around a message's claim, read when its status document is created.
PUBLISHED_AT: ContextVar[float | None] = ContextVar("gitfaas_published_at", default=None)
SETTLE_SCAN_LIMIT = 2000  # unacknowledged stream messages looked at for a run's unhandled children
SWEEP_SECONDS = 1.0
TAIL_LINES = 5
KV_WRITE_TIMEOUT_SECONDS = 5.0  # nats-py's KeyValue writes waited as long (the JetStream context's timeout)
MAX_LOG_REPLY_BYTES = 800_000  # a reply must fit in NATS's max_payload (1 MB by default)


class JobControl(Protocol):
    """What the executor in use can do with a Job after applying it (local processes, or pods)."""

    async def cancel_job(self, namespace: str | None, name: str) -> bool: ...

    async def logs(self, namespace: str | None, name: str, after: int = 0) -> tuple[list[str], int]: ...

    async def tail(self, namespace: str | None, name: str, count: int = TAIL_LINES) -> list[str]: ...


def _active_jobs(document: dict[str, Any]) -> set[tuple[str | None, str]]:
    return {(d.get("namespace"), d["name"]) for d in document.get("documents") or []
            if d.get("kind") == "Job" and d.get("name") and d.get("state") not in ("succeeded", "failed", "unknown")}


def stamp(document: dict[str, Any], now: str) -> None:
    """The timestamps a state change implies (each set once)."""
    state = document.get("state")
    has_jobs = any(d.get("kind") == "Job" for d in document.get("documents") or [])
    if state in ("applied", "running", "succeeded", "failed", "unknown") and not document.get("applied_at") \
            and document.get("documents"):
        document["applied_at"] = now
    if state in ("running", "succeeded", "failed") and has_jobs and not document.get("started_at"):
        document["started_at"] = now
    if is_request_finished(document):
        document["finished_at"] = document.get("finished_at") or now
    else:
        document["finished_at"] = None


class RunBook:
    """Keeps `gitfaas_runs` in step with the status documents (see the module's docstring)."""

    def __init__(self, runs: RunStore, js: JetStreamContext, settings: Settings) -> None:
        self.runs = runs
        self.js = js
        self.settings = settings
        self.status: StatusStore | None = None  # the run-aware store, set by it
        self.control: JobControl | None = None
        self._settling: set[str] = set()

    async def lookup(self, parent: str) -> tuple[str, bool]:
        """The run a new child of `parent` joins, and whether that run was cancelled."""
        assert self.status is not None
        document = await self.status.get(parent)
        root = (document or {}).get("root") or await self.runs.root_of(parent) or parent
        run = await self.runs.get(root)
        return root, bool(run and run.get("cancelled"))

    async def claimed(self, document: dict[str, Any]) -> None:
        """A message's request id was just claimed: it joins (or starts) its run."""
        rid = document["request_id"]
        root = document.get("root") or rid
        if root == rid:  # usually a new run: create it without reading first, nor waiting for the answer
            run = new_run(rid, document.get("topic") or "", document.get("published_at"))
            set_entry(run, rid, entry_of(document))
            evaluate(run, utc_now())
            if await self.runs.create_quietly(rid, run):
                return
        else:
            await self.runs.add_pointer(rid, root)
        await self.note(document)

    async def note(self, document: dict[str, Any]) -> None:
        """The request's outcome changed: update its entry and the run's state."""
        rid = document["request_id"]
        root = document.get("root") or rid
        entry = entry_of(document)
        cancel_it = False
        for _ in range(10):
            run, revision = await self.runs.get_with_revision(root)
            if run is None:
                run, revision = new_run(root, "", None), None
            if rid == root:
                run["topic"] = document.get("topic") or run.get("topic")
                run["started_at"] = run.get("started_at") or document.get("published_at")
            if not set_entry(run, rid, entry) and revision is not None:
                return
            cancel_it = bool(run.get("cancelled")) and not entry["done"]
            if cancel_it:
                run["requests"][rid] = {**entry, "state": "cancelled", "done": True}
            unhandled: list[int] = []
            if not run.get("cancelled") and all_done(run) and run.get("state") == "running":
                unhandled = await self.unhandled_children(run)
            run["unhandled_children"] = len(unhandled)
            evaluate(run, utc_now())
            if await self.runs.write(root, run, revision):
                if unhandled:
                    self._settling.add(root)
                break
        if cancel_it:
            await self.cancel_request(rid)

    async def unhandled_children(self, run: dict[str, Any]) -> list[int]:
        """Stream sequences of messages not yet acknowledged whose parent is a request of this run and
        which are not in it yet (published by one of its Jobs, still to be handled)."""
        stream, durable = self.settings.stream, self.settings.durable
        last = (await self.js.stream_info(stream)).state.last_seq or 0
        floor = (await self.js.consumer_info(stream, durable)).ack_floor.stream_seq or 0
        if floor >= last:
            return []
        if last - floor > SETTLE_SCAN_LIMIT:
            return [last]  # too many to look at now: wait for the ack floor (see the sweep)
        ids = set(run.get("requests") or {})
        found = []
        for msg in await direct_batch(self.runs.nc, stream, seq=floor + 1, batch=last - floor):
            seq = int((msg.headers or {}).get("Nats-Sequence", "0") or 0)
            headers = msg.headers or {}
            if seq > last or headers.get(HEADER_PARENT) not in ids:
                continue
            if request_id_of(headers, seq)[0] not in ids:
                found.append(seq)
        return found

    async def sweep(self) -> None:
        """Runs that wait on children still in the stream: look again (every `SWEEP_SECONDS`)."""
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            for root in list(self._settling):
                try:
                    await self._settle(root)
                except Exception as exc:  # noqa: BLE001 — next round
                    log.debug("run not settled yet", run_id=root, error=str(exc) or type(exc).__name__)

    async def _settle(self, root: str) -> None:
        for _ in range(10):
            run, revision = await self.runs.get_with_revision(root)
            if run is None or run.get("state") != "running" or run.get("cancelled") or not all_done(run):
                self._settling.discard(root)
                return
            unhandled = await self.unhandled_children(run)
            if len(unhandled) == run.get("unhandled_children"):
                return
            run["unhandled_children"] = len(unhandled)
            evaluate(run, utc_now())
            if await self.runs.write(root, run, revision):
                if not unhandled:
                    self._settling.discard(root)
                return

    async def cancel_request(self, request_id: str) -> None:
        """A request that joined a run already cancelled: cancel it, and delete what it applied."""
        assert self.status is not None
        now = utc_now()

        def change(document: dict[str, Any]) -> None:
            if document.get("state") not in FINAL_REQUEST_STATES:
                document.update(state="cancelled", error=CANCELLED_ERROR, finished_at=now)

        document = await self.status.update(request_id, change)
        if document is not None:
            await self.cancel_jobs(_active_jobs(document))

    async def cancel_jobs(self, jobs: set[tuple[str | None, str]] | list[dict[str, Any]]) -> list[dict[str, Any]]:
        deleted = []
        pairs = [(j.get("namespace"), j["name"]) for j in jobs] if isinstance(jobs, list) else sorted(
            jobs, key=lambda p: (p[0] or "", p[1]))
        for namespace, name in pairs:
            if self.control is None:
                break
            try:
                if await self.control.cancel_job(namespace, name):
                    deleted.append({"namespace": namespace, "name": name})
            except Exception as exc:  # noqa: BLE001 — the others still get deleted
                log.warning("job not deleted", job=name, error=str(exc) or type(exc).__name__)
        return deleted

    # ---- control requests from the bridge and the CLI ---------------------------------------

    async def on_cancel(self, msg: Msg) -> None:
        try:
            request = json.loads(msg.data or b"{}")
            deleted = await self.cancel_jobs([j for j in request.get("jobs") or []
                                              if isinstance(j, dict) and isinstance(j.get("name"), str)])
            log.info("run cancelled", run_id=request.get("run_id"), jobs_deleted=len(deleted))
            answer: dict[str, Any] = {"deleted": deleted}
        except Exception as exc:  # noqa: BLE001 — answer with the reason rather than leave the caller waiting
            answer = {"deleted": [], "error": f"{type(exc).__name__}: {exc}"}
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(json.dumps(answer).encode())

    async def on_logs(self, msg: Msg) -> None:
        try:
            answer = await self.logs(json.loads(msg.data or b"{}"))
        except Exception as exc:  # noqa: BLE001
            answer = {"jobs": [], "error": f"{type(exc).__name__}: {exc}"}
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(json.dumps(answer).encode())

    async def logs(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.control is None:
            return {"jobs": [], "error": f"the {self.settings.executor} executor runs no Job: there is no output"}
        after = request.get("after") or {}
        jobs = []
        for job in request.get("jobs") or []:
            if not isinstance(job, dict) or not isinstance(job.get("name"), str):
                continue
            namespace, name = job.get("namespace"), job["name"]
            try:
                lines, total = await self.control.logs(namespace, name, int(after.get(name, 0) or 0))
                jobs.append({"namespace": namespace, "name": name, "lines": lines, "total": total})
            except Exception as exc:  # noqa: BLE001 — the other Jobs' output still comes
                jobs.append({"namespace": namespace, "name": name, "lines": [], "total": 0,
                             "error": f"{type(exc).__name__}: {exc}"})
        # Within NATS's message size: the oldest lines of the longest outputs go first.
        size = sum(len(line) + 8 for job in jobs for line in job["lines"])
        while size > MAX_LOG_REPLY_BYTES:
            longest = max(jobs, key=lambda j: len(j["lines"]))
            cut = max(1, len(longest["lines"]) // 4)
            size -= sum(len(line) + 8 for line in longest["lines"][:cut])
            longest["lines"] = longest["lines"][cut:]
            longest["truncated"] = True
        return {"jobs": jobs}


class RunAwareStore(StatusStore):
    """The consumer's status store: stamps, keeps cancelled requests cancelled, and tells the run."""

    def __init__(self, kv: Any, book: RunBook, max_bytes: int | None = None) -> None:
        super().__init__(kv, max_bytes=max_bytes)
        self.book = book
        book.status = self

    async def claim(self, request_id: str, stream_seq: int, create: Callable[[], dict[str, Any]],
                    attempts: int = 8) -> Claim:
        parent = create().get("parent")
        root, cancelled = (await self.book.lookup(parent)) if parent else (request_id, False)
        published = PUBLISHED_AT.get()
        now = utc_now()

        def stamped() -> dict[str, Any]:
            document = create()
            document.update(root=root, published_at=rfc3339(published) if published else now)
            if cancelled:
                document.update(state="cancelled", error=CANCELLED_ERROR, finished_at=now)
            return document

        claim = await super().claim(request_id, stream_seq, stamped, attempts)
        if claim.owner is None and claim.document is not None:
            if not claim.document.get("root"):  # a document a Job reported into before the claim
                claim.document = await self.update(request_id, lambda d: d.update(
                    root=root, published_at=d.get("published_at") or stamped()["published_at"]))
                claim.revision = None
                if claim.document is None:
                    return claim
            try:
                await self.book.claimed(claim.document)
            except Exception as exc:  # noqa: BLE001 — the run index is a report, like the status
                log.warning("run not recorded", error=str(exc) or type(exc).__name__)
        return claim

    async def update(self, request_id: str, change: Callable[[dict[str, Any]], None], *,
                     create: Callable[[], dict[str, Any]] | None = None, attempts: int = 8,
                     known: Claim | None = None) -> dict[str, Any] | None:
        seen: dict[str, Any] = {}
        now = utc_now()

        def outcome(document: dict[str, Any]) -> tuple[Any, ...]:
            """What the run keeps of a request: whether it finished, how, and whether it is re-run."""
            finished = is_request_finished(document)
            return finished, document.get("state") if finished else None, bool(document.get("rerun"))

        def wrapped(document: dict[str, Any]) -> None:
            before = outcome(document)
            jobs_before, error = _active_jobs(document), document.get("error")
            was_cancelled = document.get("state") == "cancelled"
            change(document)
            if was_cancelled:
                document.update(state="cancelled", error=error or CANCELLED_ERROR)
            if not document.get("root"):
                document["root"] = document.get("parent") or request_id
            stamp(document, now)
            seen.update(before=before, after=outcome(document),
                        new_jobs=_active_jobs(document) - jobs_before if was_cancelled else set())

        document = await super().update(request_id, wrapped, create=create, attempts=attempts, known=known)
        if document is not None and seen.get("before") != seen.get("after"):
            try:
                await self.book.note(document)
            except Exception as exc:  # noqa: BLE001 — the run index is a report, like the status
                log.warning("run not updated", error=str(exc) or type(exc).__name__)
        if document is not None and seen.get("new_jobs"):  # applied while (or after) its run was cancelled
            await self.book.cancel_jobs(seen["new_jobs"])
        return document


class TailingEvents:
    """Job events on their way to the tracker: a failed Job's reason gets its last lines of output."""

    def __init__(self, inner: JobEvents, control: JobControl) -> None:
        self.inner = inner
        self.control = control

    async def job_changed(self, event: JobEvent) -> Any:
        if event.state == "failed" and "last output:" not in (event.reason or ""):
            try:
                lines = await asyncio.wait_for(self.control.tail(event.namespace, event.name, TAIL_LINES), 5)
            except Exception:  # noqa: BLE001 — the reason stays as the executor gave it
                lines = []
            if lines:
                event = dataclasses.replace(event, reason=f"{event.reason or 'failed'}; last output: "
                                                          + " | ".join(line[:300] for line in lines))
        return await self.inner.job_changed(event)


def job_control(executor: Any, settings: Settings) -> JobControl | None:
    """What can cancel Jobs and read their output for this executor: the local executor itself, the
    Kubernetes API (its own client), or nothing (dry-run)."""
    if hasattr(executor, "cancel_job") and hasattr(executor, "logs"):
        return executor  # type: ignore[no-any-return]
    if settings.executor == "kubernetes":
        from consumer.executors.k8sjobs import KubernetesJobs

        return KubernetesJobs(settings)
    return None


class ConsumerRuns:
    """Everything §11 adds to a consumer process, wired in by `consumer.service.Consumer`: the
    run-aware status store, cancel and log requests, the settle sweep and the schedules."""

    def __init__(self, consumer: Any) -> None:
        from consumer.scheduler import Scheduler

        self.consumer = consumer
        self.settings: Settings = consumer.settings
        self.book: RunBook | None = None
        self.control: JobControl | None = None
        self.scheduler = Scheduler(consumer)
        self._subscriptions: list[Any] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._writers: list[PipelinedKeyValue] = []

    async def connect(self, nc: Client, js: JetStreamContext, requests_kv: Any) -> StatusStore:
        from gitfaas.runs import RUNS_BUCKET, ensure_runs_bucket

        runs_kv = await ensure_runs_bucket(js, self.settings)
        await self._close_writers()  # those of a connection NATS closed
        # Status and run index writes, several per message, pipelined (gitfaas/jspublish.py).
        requests_kv = await PipelinedKeyValue.of(requests_kv, REQUESTS_BUCKET, nc, KV_WRITE_TIMEOUT_SECONDS)
        runs_kv = await PipelinedKeyValue.of(runs_kv, RUNS_BUCKET, nc, KV_WRITE_TIMEOUT_SECONDS)
        self._writers = [requests_kv, runs_kv]
        self.book = RunBook(RunStore(runs_kv, nc, max_bytes=nc.max_payload), js, self.settings)
        self.book.control = self.control
        return RunAwareStore(requests_kv, self.book, max_bytes=nc.max_payload)

    def events(self, tracker: JobEvents) -> JobEvents:
        """Where the executor reports Job changes (a failed Job's reason gets its last lines)."""
        self.control = job_control(self.consumer.executor, self.settings)
        if self.book is not None:
            self.book.control = self.control
        if self.control is not None and self.control is not self.consumer.executor:
            return TailingEvents(tracker, self.control)  # the local executor puts them in itself
        return tracker

    async def serve(self, nc: Client) -> None:
        from gitfaas.runs import control_cancel, control_logs

        assert self.book is not None
        prefix = self.settings.subject_prefix
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        self._subscriptions = [await nc.subscribe(control_cancel(prefix), cb=self.book.on_cancel),
                               await nc.subscribe(control_logs(prefix), queue="gitfaas-logs", cb=self.book.on_logs)]
        for task in self._tasks:
            task.cancel()
        self._tasks = [asyncio.create_task(self.book.sweep(), name="consumer-run-sweep"),
                       asyncio.create_task(self.scheduler.run(), name="consumer-schedules")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        close = getattr(self.control, "close", None)
        if close is not None and self.control is not self.consumer.executor:
            with contextlib.suppress(Exception):
                await close()
        await self._close_writers()

    async def _close_writers(self) -> None:
        writers, self._writers = self._writers, []
        for writer in writers:
            await writer.close()

    @staticmethod
    def message_time(published_at: float | None, msg: Msg) -> None:
        """When the message being handled was published, for its status document (`published_at`)."""
        stored = getattr(getattr(msg, "metadata", None), "timestamp", None)
        PUBLISHED_AT.set(published_at if published_at is not None else stored.timestamp() if stored else None)

    @staticmethod
    def cancelled(claim: Claim) -> bool:
        """The message belongs to a cancelled run: recorded `cancelled`, nothing of it is applied."""
        return claim.owner is None and claim.document is not None and claim.document.get("state") == "cancelled"
