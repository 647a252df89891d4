"""The consumer service: keep the repository in sync, turn each message into applied objects.

Flow per message: topic → the documents of the configuration in use → values from the message →
render → stamp and check policy → apply each in order → ack. A failure is either transient
(nak, JetStream redelivers later) or permanent (dead letter at once); see `consumer.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import nats.errors
import structlog
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from consumer import metrics
from consumer.checks import dry_run_problems
from consumer.configuration import Configuration
from consumer.documents import Request, render_request
from consumer.errors import HandlingError, PermanentError, TransientError
from consumer.executors.base import Applied, Executor
from consumer.executors.factory import make_executor
from consumer.pull import ContinuousPull
from consumer.reconcile import mark_lost_jobs
from consumer.repository import Repository
from consumer.runs import ConsumerRuns
from consumer.tracking import RequestTracker
from consumer.variables import function_uid
from gitfaas import natsconn
from gitfaas.httperrors import JsonErrorsRunner
from gitfaas.jspublish import EXPECTED_STREAM
from gitfaas.logs import get_logger
from gitfaas.message import Inbound, read_request_headers
from gitfaas.metrics import metrics_view
from gitfaas.replay import replay_request
from gitfaas.settings import Settings
from gitfaas.status import Claim
from gitfaas.subjects import (
    HEADER_ATTEMPTS,
    HEADER_BODY_OMITTED,
    HEADER_ERROR,
    HEADER_REQUEST_ID,
    HEADER_RETRY,
    HEADER_STREAM_SEQ,
    Subjects,
    decode_params,
)

log = get_logger("gitfaas.consumer")

NO_CONFIG_RETRY_SECONDS = 2.0
MAX_NAK_DELAY_SECONDS = 60.0
MAX_RECONNECT_DELAY_SECONDS = 10.0


class Stopping(Exception):
    """A held message's turn to be applied came after SIGTERM: it is handed back, not started."""


def nak_delay(delivered: int) -> float:
    """Exponential redelivery delay for transient failures: 1s, 2s, 4s ... capped."""
    return min(MAX_NAK_DELAY_SECONDS, 2.0 ** max(0, delivered - 1))


def end_to_end_seconds(inbound: Inbound) -> float | None:
    """Since the bridge accepted the message (its `Gitfaas-Published-At`), if it says."""
    return None if inbound.published_at is None else max(0.0, time.time() - inbound.published_at)


def dead_letter_headers(original: dict[str, str] | None) -> dict[str, str]:
    """The original's headers a dead letter keeps: all but `Nats-*`, which would steer JetStream when the
    letter is stored (`Nats-Expected-Stream` would refuse it, `Nats-Msg-Id` could drop it as a duplicate),
    and names a client may not send (another client may have: they would stop the letter being sent)."""
    return {k: v for k, v in (original or {}).items()
            if not k.lower().startswith("nats-") and natsconn.HEADER_NAME.fullmatch(k)}


def identity_of(msg: Msg, request_id: str) -> str:
    """What makes this stored message unique and stays the same on its redeliveries."""
    meta = msg.metadata
    return f"{request_id}|{meta.sequence.stream}|{meta.timestamp.isoformat() if meta.timestamp else ''}"


class Consumer:
    def __init__(self, settings: Settings, executor: Executor | None = None) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.subject_prefix)
        self.executor = executor or make_executor(settings)
        self.repository = Repository(settings)
        self.tracker = RequestTracker(retries_of=self._retries_of, retry=self._rerun)
        self.runs = ConsumerRuns(self)  # §11: runs, cancel, logs, schedules
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self._pull: ContinuousPull | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[Any]] = []
        self._keeper: asyncio.Task[None] | None = None  # keep-alives of the messages in flight, until they end
        self._http: web.AppRunner | None = None
        self._topic_limits: dict[str, asyncio.Semaphore] = {}
        self._applying = asyncio.Semaphore(settings.max_concurrency)  # messages whose objects are being applied
        self._in_flight: dict[int, tuple[Msg, float]] = {}  # id(msg) -> (msg, when its next keep-alive is due)
        self._keep_alive_every = max(0.5, settings.ack_wait_seconds / 3)
        self.http_port: int | None = None
        self.handled = 0  # messages finished by this process (acked or given up on)
        self.last_applied = time.monotonic()  # for the stall signal
        self.waiting_since: float | None = None  # since when work waits (the stall signal counts from here)
        self._retrying: dict[int, float] = {}  # stream seq -> when it was handed back after a transient failure
        self._stall_progress = 0.0  # `last_applied` when the stall signal fired
        self.stalled = False
        self.queue: dict[str, int] = {}
        self.reconnects = 0  # connections re-established after NATS closed one
        self._stopping = False
        self._dispatcher: asyncio.Task[None] | None = None
        self._reestablishing: asyncio.Task[None] | None = None
        self._nats_lost_at: float | None = None  # monotonic time NATS was last seen unreachable

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self._stopping = False
        await self._connect()
        await self.executor.start(self.runs.events(self.tracker))
        if s.dry_run_on_load:
            self.repository.check = self._dry_run_commit
        await self.refresh()
        await self._start_http()
        await self._serve_nats()
        if s.git_poll_seconds > 0:
            self._loops.append(asyncio.create_task(self._poll(), name="consumer-git-poll"))
        self._loops.append(asyncio.create_task(self._watch_queue(), name="consumer-queue-metrics"))
        self._keeper = asyncio.create_task(self._keep_alive(), name="consumer-keep-alive")
        if hasattr(self.executor, "job_watch"):
            self._loops.append(asyncio.create_task(self._mark_lost_jobs(), name="consumer-lost-jobs"))
        log.info("consumer started", stream=s.stream, durable=s.durable, executor=s.executor,
                 source=self.repository.gitsync.display_source, max_concurrency=s.max_concurrency,
                 http_port=self.http_port)

    async def _connect(self) -> None:
        """A NATS connection and everything held through it: the stream, the buckets, the status store."""
        s = self.settings
        nc = await natsconn.connect(s, "gitfaas-consumer", reconnected_cb=self._on_reconnected,
                                    disconnected_cb=self._on_disconnected, closed_cb=self._on_closed)
        try:
            js = nc.jetstream()
            self.repository.bucket, requests_kv = await natsconn.ensure_all(js, s)
        except BaseException:
            await nc.close()
            raise
        self.nc, self.js = nc, js
        self.tracker.store = await self.runs.connect(nc, js, requests_kv)
        self._nats_lost_at = None

    async def _serve_nats(self) -> None:
        """Answer refresh requests and pull messages, on the current connection."""
        assert self.nc is not None
        s = self.settings
        await self.nc.subscribe(self.subjects.refresh, cb=self._on_refresh_request)
        self._pull = ContinuousPull(self.nc, s.stream, s.durable, s.max_concurrency * natsconn.MESSAGES_HELD_PER_SLOT)
        await self._pull.start()
        self._dispatcher = asyncio.create_task(self._dispatch(self._pull), name="consumer-dispatch")
        await self.runs.serve(self.nc)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking messages, let in-flight ones finish (up to `grace`), give back the rest."""
        self._stopping = True
        for task in (*self._loops, self._dispatcher, self._reestablishing):
            if task is not None:
                task.cancel()
        if self._pull is not None:
            for msg in await self._pull.stop():
                with contextlib.suppress(Exception):
                    await msg.nak()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=grace)
            for task in pending:
                task.cancel()  # each hands its message back (nak) as it unwinds: let that happen
            if pending:
                await asyncio.wait(pending, timeout=2)
        if self._keeper is not None:
            self._keeper.cancel()
        if self._http is not None:
            await self._http.cleanup()
        await self.runs.stop()
        # Before NATS closes: the executor's last reports (e.g. local Jobs interrupted) still land.
        await self.executor.close()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)
            await self.nc.close()
        log.info("consumer stopped")

    async def _on_reconnected(self) -> None:
        log.info("nats reconnected")
        self._nats_lost_at = None
        if self._pull is not None:
            await self._pull.reset()

    async def _on_disconnected(self) -> None:
        log.warning("nats disconnected")
        self._nats_lost_at = self._nats_lost_at or time.monotonic()

    async def _on_closed(self) -> None:
        """NATS closed the connection for good (the client does not reconnect after a protocol error
        such as `maximum control line exceeded`): make a new one, unless we are the ones stopping."""
        if self._stopping or self.nc is None or not self.nc.is_closed:
            return
        self._nats_lost_at = self._nats_lost_at or time.monotonic()
        if self._reestablishing is None or self._reestablishing.done():
            log.error("nats connection closed, re-establishing it", error=str(self.nc.last_error or "closed"))
            self._reestablishing = asyncio.create_task(self._reestablish(), name="consumer-nats-reestablish")

    async def _reestablish(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        if self._pull is not None:
            await self._pull.stop()  # what it held comes back from JetStream after ACK_WAIT_SECONDS
        delay = 0.5
        while not self._stopping:
            try:
                await self._connect()
                await self._serve_nats()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — keep trying: /healthz reports how long it lasts
                log.error("nats connection not re-established, retrying", error=str(exc) or type(exc).__name__,
                          in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RECONNECT_DELAY_SECONDS)
                continue
            self.reconnects += 1
            log.info("nats connection re-established")
            return

    def nats_down_seconds(self) -> float:
        """How long NATS has been unreachable (0 while connected)."""
        if self.nc is not None and self.nc.is_connected:
            self._nats_lost_at = None
            return 0.0
        now = time.monotonic()
        self._nats_lost_at = self._nats_lost_at or now
        return now - self._nats_lost_at

    # ---- configuration ---------------------------------------------------------------------

    @property
    def config(self) -> Configuration | None:
        return self.repository.config

    async def refresh(self) -> dict[str, Any]:
        return await self.repository.refresh()

    async def _on_refresh_request(self, msg: Msg) -> None:
        state = await self.refresh()
        if msg.reply:
            await msg.respond(json.dumps(state).encode())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.git_poll_seconds)
            try:
                await self.refresh()
            except Exception:
                log.exception("git poll failed")

    # ---- messages --------------------------------------------------------------------------

    async def _dispatch(self, pull: ContinuousPull) -> None:
        while True:
            msg = await pull.get()
            task = asyncio.create_task(self._handle(msg, pull))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Msg, pull: ContinuousPull) -> None:
        metrics.IN_FLIGHT.inc()
        try:
            await self._handle_one(msg)
        finally:
            metrics.IN_FLIGHT.dec()
            structlog.contextvars.clear_contextvars()
            await pull.release()  # the pull that delivered it, even if the connection was replaced since

    async def _handle_one(self, msg: Msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        topic = self.subjects.topic_of(msg.subject) or msg.subject
        inbound = read_request_headers(msg.headers, seq)  # every header value we use, checked
        request_id = inbound.request_id
        structlog.contextvars.bind_contextvars(request_id=request_id, topic=topic, stream_seq=seq)
        if meta.num_delivered > 1:
            metrics.REDELIVERIES.labels(topic).inc()
        log.debug("received", attempt=meta.num_delivered)
        if inbound.refusal is not None:
            await self._give_up(msg, topic, inbound, inbound.refusal)
            return
        config = self.config
        if config is None:
            log.info("no configuration loaded yet, message waits")
            await _settle(msg.nak(delay=NO_CONFIG_RETRY_SECONDS))
            return
        started = time.perf_counter()
        self._in_flight[id(msg)] = (msg, time.monotonic() + self._keep_alive_every)
        try:
            # The id is this message's before anything of it is applied: a message reusing another's
            # id is refused here, so its objects never carry that id and its status never lands there.
            self.runs.message_time(inbound.published_at, msg)
            claim = await self.tracker.claim(request_id, topic=topic, stream_seq=seq, parent=inbound.parent,
                                             retry=inbound.retry)
            if claim.owner is not None:
                inbound = Inbound(request_id=f"seq-{seq}", published_at=inbound.published_at)
                raise PermanentError(f"{HEADER_REQUEST_ID} {request_id} already belongs to stream message "
                                     f"{claim.owner}; a request id is used by one message only")
            if self.runs.cancelled(claim):  # its run was cancelled: recorded so, nothing of it applied
                log.info("not applied: its run was cancelled")
                await _settle(msg.ack())
                self.handled += 1
                return
            applied = await self._process(msg, config, topic, request_id, seq)
        except Stopping:
            log.info("not applied: the consumer is stopping, the message goes back to the stream")
            await _settle(msg.nak())
        except PermanentError as exc:
            await self._give_up(msg, topic, inbound, str(exc), applied=list(exc.applied))
        except TransientError as exc:
            if meta.num_delivered >= self.settings.max_deliver:
                await self._give_up(msg, topic, inbound, f"{exc} (after {meta.num_delivered} deliveries)",
                                    applied=list(exc.applied))
            else:
                delay = nak_delay(meta.num_delivered)
                log.warning("transient failure, will retry", error=str(exc), attempt=meta.num_delivered,
                            retry_in_s=delay)
                metrics.MESSAGES.labels(topic, "retried").inc()
                self._retrying[seq] = time.monotonic()
                await _settle(msg.nak(delay=delay))
        except asyncio.CancelledError:
            # Shutdown overtook this message: hand it back now rather than after ack_wait.
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nak())
            raise
        except Exception as exc:  # unclassified (a bug, or a failure we do not know): transient, bounded
            log.exception("unexpected error while handling message")
            if meta.num_delivered >= self.settings.max_deliver:
                await self._give_up(msg, topic, inbound, f"internal error: {type(exc).__name__}: {exc}")
            else:
                await _settle(msg.nak(delay=nak_delay(meta.num_delivered)))
        else:
            await self._record(inbound, topic, msg, state="applied", commit=config.commit, applied=applied,
                               claimed=claim)
            await _settle(msg.ack())
            self.handled += 1
            self.last_applied = time.monotonic()
            self.waiting_since = None
            self._retrying.pop(seq, None)
            elapsed = time.perf_counter() - started
            metrics.MESSAGES.labels(topic, "applied").inc()
            metrics.APPLY_SECONDS.observe(elapsed)
            since_publish = end_to_end_seconds(inbound)
            if since_publish is not None:
                metrics.END_TO_END_SECONDS.observe(since_publish)
            log.info("applied", commit=config.commit, objects=[a.as_dict() for a in applied],
                     duration_ms=round(elapsed * 1000, 1), attempt=meta.num_delivered,
                     since_publish_ms=round(since_publish * 1000, 1) if since_publish is not None else None)
        finally:
            self._in_flight.pop(id(msg), None)

    async def _keep_alive(self) -> None:
        """Tell JetStream we are still on each message in flight, so a slow apply is not redelivered to
        someone else: every `_keep_alive_every` seconds (a third of ACK_WAIT_SECONDS), at most a quarter
        of that late. One loop for all of them: a task per message cost ~3% of the consumer's CPU (B2)."""
        step = self._keep_alive_every / 4
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            due = [msg for msg, at in self._in_flight.values() if at <= now]
            for msg in due:
                if id(msg) in self._in_flight:  # (not finished meanwhile)
                    self._in_flight[id(msg)] = (msg, now + self._keep_alive_every)
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    async def _record(self, inbound: Inbound, topic: str, msg: Msg, *, state: str, commit: str | None = None,
                      applied: list[Applied] | None = None, error: str | None = None,
                      claimed: Claim | None = None) -> None:
        meta = msg.metadata
        await self.tracker.record(inbound.request_id, topic=topic, stream_seq=meta.sequence.stream,
                                  attempts=meta.num_delivered, parent=inbound.parent, state=state, commit=commit,
                                  applied=applied, error=error, retry=inbound.retry, claimed=claimed)

    def _retries_of(self, topic: str) -> int:
        config = self.config
        found = config.topics.get(topic) if config else None
        return found.retries if found else 0

    async def _rerun(self, document: dict[str, Any]) -> None:
        """A topic's `retries`: publish the failed request again, linked to it, numbered."""
        assert self.js is not None and self.tracker.store is not None
        number = int(document.get("retry") or 0) + 1
        again = await replay_request(self.js, self.tracker.store, self.settings, document["request_id"],
                                     {HEADER_RETRY: str(number)})
        log.info("failed request re-run", request_id=document["request_id"], retry=number,
                 new_request_id=again.request_id, topic=document.get("topic"))

    async def _process(
        self, msg: Msg, config: Configuration, topic_name: str, request_id: str, seq: int
    ) -> list[Applied]:
        identity = identity_of(msg, request_id)
        documents = render_request(self.settings, config, Request(
            topic=topic_name, request_id=request_id, identity=identity, stream_seq=seq,
            body=msg.data or b"", params=decode_params(msg.headers)))
        topic = config.topics[topic_name]
        jobs = sum(1 for d in documents if d.get("kind") == "Job" and d.get("apiVersion") == "batch/v1")
        held = bool(topic.max_active_jobs and jobs and self.settings.executor != "dry-run")  # dry-run Jobs never end
        if held:
            assert topic.max_active_jobs is not None
            if self.tracker.active_jobs.count(topic_name) + jobs > topic.max_active_jobs:
                log.info("held: the topic has reached maxActiveJobs", active=self.tracker.active_jobs.count(topic_name),
                         max_active_jobs=topic.max_active_jobs)
            await self.tracker.active_jobs.admit(topic_name, topic.max_active_jobs, jobs)
        applied: list[Applied] = []
        try:
            # The topic's turn first, then the process's: a message waiting for its topic takes no slot.
            async with self._topic_limit(topic_name, topic.max_concurrency), self._applying:
                if self._stopping:  # its turn came during a shutdown: another process applies it
                    raise Stopping
                for ordinal, document in enumerate(documents):
                    try:
                        result = await self.executor.apply(document)
                    except HandlingError as exc:
                        exc.applied = tuple(applied)  # the status lists them at once, dead or not
                        raise
                    applied.append(result.with_function_uid(
                        function_uid(request_id, identity, ordinal)))
        finally:
            if held:
                await self.tracker.active_jobs.applied(topic_name, jobs, [
                    (a.namespace, a.name) for a in applied if a.kind == "Job"])
        return applied

    def _topic_limit(self, topic: str, limit: int | None) -> asyncio.Semaphore | contextlib.nullcontext[None]:
        if not limit:
            return contextlib.nullcontext()
        semaphore = self._topic_limits.get(topic)
        if semaphore is None:
            semaphore = self._topic_limits[topic] = asyncio.Semaphore(limit)
        return semaphore

    async def _give_up(self, msg: Msg, topic: str, inbound: Inbound, reason: str,
                       applied: list[Applied] | None = None) -> None:
        """Dead-letter the message with its reason, then stop JetStream redelivering it."""
        log.error("message given up on", error=reason)
        assert self.js is not None
        ours = {
            HEADER_REQUEST_ID: inbound.request_id,
            HEADER_ERROR: " ".join(reason.split())[:1000].encode(errors="replace").decode(),
            HEADER_STREAM_SEQ: str(msg.metadata.sequence.stream),
            HEADER_ATTEMPTS: str(msg.metadata.num_delivered),
        }
        subject = self.subjects.dead(topic)
        data = msg.data or b""
        headers = {**dead_letter_headers(msg.headers), **ours}
        # js.publish adds the stream it expects as a header of its own.
        expected = {EXPECTED_STREAM: self.settings.dead_stream}
        assert self.nc is not None
        if natsconn.wire_size(data, {**headers, **expected}) > self.nc.max_payload:
            # The original and our headers do not fit in one message (the server would close the
            # connection): keep the reason, leave the body and its headers in the stream, where
            # `gitfaas dead redrive` reads them back.
            data, headers = b"", {**ours, HEADER_BODY_OMITTED: str(len(msg.data or b""))}
        try:
            await self.js.publish(subject, data, headers=headers, stream=self.settings.dead_stream)
        except Exception as exc:  # noqa: BLE001 — without a dead letter, keep the message
            log.error("dead letter not stored, message kept for redelivery", error=str(exc) or type(exc).__name__)
            await _settle(msg.nak(delay=MAX_NAK_DELAY_SECONDS))
            return
        await self._record(inbound, topic, msg, state="dead", error=reason, applied=applied or None)
        await _settle(msg.term())
        self.handled += 1
        self.last_applied = time.monotonic()  # a message given up on is progress too
        self.waiting_since = None
        self._retrying.pop(msg.metadata.sequence.stream, None)
        metrics.DEAD_LETTERS.labels(topic).inc()
        metrics.MESSAGES.labels(topic, "dead").inc()

    async def _mark_lost_jobs(self) -> None:
        """Once the Job watch has listed everything: requests whose Jobs are gone without an outcome."""
        try:
            watch = await self.executor.job_watch()  # type: ignore[attr-defined]
            if watch is not None:
                lost = await mark_lost_jobs(self.tracker, watch)
                if lost:
                    log.warning("requests with lost Job outcomes marked unknown", jobs=lost)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 — a report, not a duty: the next start tries again
            log.warning("lost Job outcomes not checked", error=str(exc) or type(exc).__name__)

    async def _dry_run_commit(self, config: Configuration) -> list[str]:
        """`DRY_RUN_ON_LOAD`: what the API server would refuse in this commit (server-side dry-run of
        every document rendered with sample values); a commit with problems is refused."""
        problems, unchecked = await dry_run_problems(self.settings, config, self.executor)
        if unchecked:
            log.warning("commit not checked by the API server (dry-run failed)", commit=config.commit,
                        reason=unchecked)
        return problems

    # ---- HTTP: health, readiness, metrics --------------------------------------------------

    async def _watch_queue(self) -> None:
        """JetStream's own view of the queue, and the stall signal: work waits, nothing moves."""
        interval = max(0.2, min(5.0, self.settings.stall_seconds / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                assert self.js is not None
                info = await self.js.consumer_info(self.settings.stream, self.settings.durable)
            except Exception as exc:  # noqa: BLE001 — metrics wait for the next round
                log.debug("consumer info unavailable", error=str(exc) or type(exc).__name__)
                continue
            self.queue = {"pending": info.num_pending or 0, "ack_pending": info.num_ack_pending or 0,
                          "redelivered": info.num_redelivered or 0}
            metrics.STREAM_PENDING.set(self.queue["pending"])
            metrics.STREAM_ACK_PENDING.set(self.queue["ack_pending"])
            metrics.STREAM_REDELIVERED.set(self.queue["redelivered"])
            # Stalled: work has been waiting for STALL_SECONDS and nothing moved meanwhile. Time
            # without work is not counted (issue 14: an idle night made an outage look stalled at once).
            # A message handed back with a delay (nak) may count as neither pending nor ack-pending for a
            # while: the ones this process handed back count as waiting until handled (or long forgotten).
            now = time.monotonic()
            horizon = MAX_NAK_DELAY_SECONDS + self.settings.ack_wait_seconds
            self._retrying = {seq: at for seq, at in self._retrying.items() if now - at < horizon}
            waiting = self.queue["pending"] + self.queue["ack_pending"] + self.queue["redelivered"] > 0 \
                or bool(self._retrying)
            if not waiting:
                self.waiting_since = None
            elif self.waiting_since is None:
                self.waiting_since = now
            stalled = waiting and now - max(self.last_applied, self.waiting_since or now) > self.settings.stall_seconds
            # Once stalled, it stays so until something is applied or dead-lettered (no flicker between samples).
            stalled = stalled or (self.stalled and self.last_applied == self._stall_progress)
            if stalled and not self.stalled:
                self._stall_progress = self.last_applied
            if stalled and not self.stalled:
                log.error("stalled: messages wait but nothing was applied", queue=self.queue,
                          stall_seconds=self.settings.stall_seconds)
            self.stalled = stalled
            metrics.STALLED.set(1 if stalled else 0)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        # Ready once a re-established connection also serves again (pull consumer, subscriptions).
        serving = self._reestablishing is None or self._reestablishing.done()
        connected = bool(self.nc and self.nc.is_connected) and serving
        detail = {
            "nats": "connected" if connected else "closed" if self.nc is not None and self.nc.is_closed
            else "disconnected",
            "configuration": self.config.commit if self.config else None,
            "error": self.repository.error,
            "queue": self.queue,
            "stalled": self.stalled,
        }
        return connected and self.config is not None, detail

    async def _start_http(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", metrics_view)
        self._http = JsonErrorsRunner(app, access_log=None)
        await self._http.setup()
        site = web.TCPSite(self._http, self.settings.consumer_host, self.settings.consumer_http_port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.http_port = sockets[0].getsockname()[1] if sockets else self.settings.consumer_http_port

    async def _healthz(self, _request: web.Request) -> web.Response:
        """Liveness: fails once NATS has been unreachable longer than `NATS_UNHEALTHY_SECONDS`, so the
        orchestrator restarts a process that cannot recover by itself."""
        down = self.nats_down_seconds()
        limit = self.settings.nats_unhealthy_seconds
        if limit and down > limit:
            return web.json_response({"status": "unhealthy", "nats_down_seconds": round(down, 1),
                                      "error": f"NATS unreachable for {down:.0f}s (NATS_UNHEALTHY_SECONDS={limit:g})"},
                                     status=503)
        return web.json_response({"status": "ok", "nats_down_seconds": round(down, 1)})

    async def _readyz(self, _request: web.Request) -> web.Response:
        ok, detail = self.ready()
        return web.json_response({"ready": ok, **detail}, status=200 if ok else 503)


async def _settle(reply: Any) -> None:
    """Ack, nak or term a message. On a connection that has since closed it cannot be sent: JetStream
    then redelivers the message after ACK_WAIT_SECONDS, and applying it again changes nothing."""
    try:
        await reply
    except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
            nats.errors.TimeoutError, nats.errors.OutboundBufferLimitError) as exc:
        log.warning("message reply not sent; JetStream will redeliver it", error=type(exc).__name__)


async def run(settings: Settings) -> None:
    """`gitfaas consumer`: run until SIGTERM/SIGINT."""
    consumer = Consumer(settings)
    await consumer.start()
    try:
        await asyncio.Event().wait()
    finally:
        await consumer.stop()
