"""`POST /publish/{topic}` (§5): validate, publish to JetStream, answer once it has stored the message.

`?wait=applied|completed` answers from a watch of the request's status key, `?wait=run` (§11) from a
watch of its run; what a publish is refused for is `gitfaas.publishing`'s, shared with `gitfaas
publish`. This is the bridge's hot path: it reads the configuration from memory (`Bridge.configuration`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from prometheus_client import Counter, Histogram

from bridge.unavailable import NATS_UNAVAILABLE
from gitfaas import natsconn, safejson
from gitfaas.jspublish import EXPECTED_STREAM
from gitfaas.logs import get_logger
from gitfaas.message import request_headers
from gitfaas.metrics import json_error
from gitfaas.publishing import WAITS, content_type_refusal, declares_json, too_large, wait_status
from gitfaas.replay import ReplayError, stored_message
from gitfaas.runs import is_run_finished, run_view
from gitfaas.subjects import HEADER_PARENT, InvalidName, check_topic, new_request_id

log = get_logger("gitfaas.bridge")

PUBLISHES = Counter("gitfaas_bridge_publishes_total", "Publish requests answered, by topic and HTTP code",
                    ["topic", "code"])
PUBLISH_SECONDS = Histogram("gitfaas_bridge_publish_seconds", "Time from request to JetStream ack",
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))

# Issue 17: `Counter.labels` takes a lock and builds its key on every call; the children are kept here
# (bounded: topic labels are the configured topics or "-", codes a few dozen).
_PUBLISHES_CHILDREN: dict[tuple[str, int], Any] = {}


def _count_publish(label: str, status: int) -> None:
    child = _PUBLISHES_CHILDREN.get((label, status))
    if child is None:
        if len(_PUBLISHES_CHILDREN) > 4096:
            _PUBLISHES_CHILDREN.clear()
        child = _PUBLISHES_CHILDREN[label, status] = PUBLISHES.labels(label, str(status))
    child.inc()


# The 202 answer; the same document as json_answer would write for {"request_id", "topic", "stream_seq", "duplicate"}.
ACCEPTED = b'{"request_id":"%s","topic":"%s","stream_seq":%d,"duplicate":%s}'
# What the NATS headers of a publish can take at most: the fixed ones (request id, time, content type,
# Idempotency-Key, parent, stream: under 1.5 KiB) and, per character of the URL, a parameter's header
# (name, "Gitfaas-Param-", a UTF-8 character percent-encoded: under 32 bytes).
HEADERS_BOUND = 4096
URL_HEADER_FACTOR = 32

# Query parameters that steer the bridge itself rather than becoming template variables.
RESERVED_QUERY = frozenset({"wait", "timeout", "parent"})
PUBLISH_TIMEOUT_SECONDS = 5.0
DEFAULT_WAIT_SECONDS = 30.0
MAX_WAIT_SECONDS = 300.0


# What a Content-Type header says, by its text: aiohttp parses the header anew for every request. Bounded:
# a client choosing a new header text each time only keeps the table small.
_CONTENT_TYPES: dict[str, tuple[str, str | None, bool]] = {}


def _content_type(request: web.Request) -> tuple[str, str | None, bool]:
    """(media type, why it is refused or None, whether the body must be JSON)."""
    raw = request.headers.get("Content-Type") or ""
    known = _CONTENT_TYPES.get(raw)
    if known is None:
        media_type = request.content_type if raw else ""
        known = (media_type, content_type_refusal(media_type), declares_json(media_type))
        if len(_CONTENT_TYPES) >= 256:
            _CONTENT_TYPES.clear()
        _CONTENT_TYPES[raw] = known
    return known


def wait_timeout(request: web.Request) -> float | web.Response:
    """`?timeout=S` of a wait, or the error answer."""
    try:
        timeout = float(request.query.get("timeout", DEFAULT_WAIT_SECONDS))
    except ValueError:
        return json_error(400, "timeout must be a number of seconds")
    if not 0 < timeout <= MAX_WAIT_SECONDS:
        return json_error(400, f"timeout must be between 0 and {MAX_WAIT_SECONDS:.0f} seconds")
    return timeout


class PublishRoutes:
    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge  # bridge.app.Bridge (not imported: it imports this module)

    def add(self, app: web.Application) -> None:
        app.router.add_post("/publish/{topic}", self.publish)

    async def publish(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        topic = request.match_info["topic"]
        return self.counted(topic, await self.respond(request, topic), started)

    def counted(self, topic: str, response: web.Response, started: float) -> web.Response:
        """The publish metrics of an answer (`started`: perf_counter when the request came)."""
        _count_publish(topic if topic in self.bridge.known_topics else "-", response.status)
        if response.status == 202:
            PUBLISH_SECONDS.observe(time.perf_counter() - started)
        return response

    async def respond(self, request: web.Request, topic: str) -> web.Response:
        """The answer to a publish to `topic`, from the router or the bridge's direct route (`bridge.app.serve`)."""
        try:
            check_topic(topic)
        except InvalidName as exc:
            return json_error(400, str(exc))
        query = request.query
        wait = query.get("wait") if query else None
        if wait is not None and wait not in (*WAITS, "run"):
            return json_error(400, f"wait must be {', '.join(repr(w) for w in WAITS)} or 'run'")
        timeout = wait_timeout(request) if query else DEFAULT_WAIT_SECONDS
        if isinstance(timeout, web.Response):
            return timeout
        publisher = self.bridge.publisher
        if publisher is None or not publisher.nc.is_connected:
            return json_error(503, "NATS is unavailable; the message was not accepted")
        params = [(k, v) for k, v in query.items() if k not in RESERVED_QUERY] if query else []
        # No configuration yet, an unknown topic, or a parameter that no value and no default gives.
        refusal = self.bridge.configuration.refusal(topic, {name for name, _ in params})
        if refusal is not None:
            return json_error(refusal.status, refusal.error)
        content_type, refused_type, is_json = _content_type(request)
        if refused_type is not None:
            return json_error(415, refused_type)
        limit = self.bridge.settings.max_payload_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            return json_error(413, too_large(limit))
        try:  # aiohttp counts while reading (a chunked upload has no length): never more than the limit + a chunk
            body = await request.read()  # bounded by client_max_size = MAX_PAYLOAD_BYTES (bridge/app.py)
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, too_large(limit))
        if is_json:
            try:
                safejson.validate(body or b"null")  # nested at most MAX_JSON_DEPTH levels, as the consumer reads it
            except (ValueError, UnicodeDecodeError) as exc:
                return json_error(400, f"body is not valid JSON: {exc}")

        request_id = new_request_id()
        # A parent, an Idempotency-Key and the content type travel in NATS headers: `request_headers`
        # checks each (a request id's charset and length, visible ASCII) and refuses with a 400.
        parent = request.query.get("parent") or request.headers.get(HEADER_PARENT)
        try:
            headers = request_headers(
                request_id,
                params,
                content_type=content_type,
                idempotency_key=request.headers.get("Idempotency-Key"),
                parent=parent,
            )
        except InvalidName as exc:
            return json_error(400, str(exc))
        # nats-server counts the headers too, and closes the connection of a client that goes over.
        max_payload = publisher.nc.max_payload
        # (Counted only near the limit: the headers come from the URL and a few bounded headers, so they
        # are at most HEADERS_BOUND + a constant times the URL's length, with room to spare.)
        if (len(body) + HEADERS_BOUND + URL_HEADER_FACTOR * len(request.raw_path) > max_payload
                and natsconn.wire_size(body, {**headers, EXPECTED_STREAM: publisher.stream}) > max_payload):
            return json_error(413, f"the message (body and headers) is larger than NATS accepts ({max_payload} bytes)")

        try:
            ack = await (await publisher.send(self.bridge.subjects.topic(topic), body, headers))
        except NATS_UNAVAILABLE as exc:
            log.warning("publish not stored", topic=topic, error=str(exc) or type(exc).__name__)
            return json_error(503, "JetStream did not store the message; it was not accepted: "
                                   f"{type(exc).__name__}")
        if ack.duplicate:
            request_id = await self._original_request_id(ack.seq) or request_id
        if wait is None:  # the usual answer, written without a dict (a checked topic and a UUID need no escaping)
            return web.Response(body=ACCEPTED % (request_id.encode(), topic.encode(), ack.seq,
                                                 b"true" if ack.duplicate else b"false"),
                                status=202, content_type="application/json")
        answer = {"request_id": request_id, "topic": topic, "stream_seq": ack.seq, "duplicate": bool(ack.duplicate)}
        return await self._wait(answer, wait, timeout)

    async def _wait_run(self, answer: dict[str, Any], timeout: float) -> web.Response:
        """`?wait=run`: until the run this request belongs to is finished (§11)."""
        status, runs = self.bridge.status, self.bridge.runs
        assert status is not None and runs is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:  # the run is known once the consumer has claimed the request (its `root`)
            known, document = await status.wait(answer["request_id"], lambda d: bool(d.get("root")), timeout)
            if not known or document is None:
                return web.json_response({**answer, "state": (document or {}).get("state", "pending")}, status=504)
            reached, run = await runs.wait(document["root"], is_run_finished, max(0.001, deadline - loop.time()))
            if run is None:
                return web.json_response({**answer, "run_id": document["root"], "state": "running"}, status=504)
            view = await run_view(status, run)
        except NATS_UNAVAILABLE as exc:
            return json_error(503, f"accepted as {answer['request_id']}, but its status is unavailable: "
                                   f"{type(exc).__name__}")
        return web.json_response(view, status=wait_status(reached, view))

    async def _wait(self, answer: dict[str, Any], wait: str, timeout: float) -> web.Response:
        """`?wait=`: answer from a watch of the request's status key, not by polling."""
        assert self.bridge.status is not None
        if wait == "run":
            return await self._wait_run(answer, timeout)
        try:
            reached, document = await self.bridge.status.wait(answer["request_id"], WAITS[wait], timeout)
        except NATS_UNAVAILABLE as exc:
            return json_error(503, f"accepted as {answer['request_id']}, but its status is unavailable: "
                                   f"{type(exc).__name__}")
        if document is None:
            document = {**answer, "state": "pending"}
        # 200 reached; 422 the request ended failed, dead or cancelled; 504 still on its way.
        return web.json_response(document, status=wait_status(reached, document))

    async def _original_request_id(self, seq: int) -> str | None:
        """A duplicate publish answers with the first request's id, read back from the stream."""
        assert self.bridge.js is not None
        try:
            original = await stored_message(self.bridge.js, self.bridge.settings.stream, seq)
        except (*NATS_UNAVAILABLE, ReplayError):
            return None
        return original.request_id  # as the consumer sees it: its own if valid, else seq-<n>
