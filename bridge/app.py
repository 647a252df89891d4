"""The bridge: a thin, stateless HTTP edge in front of JetStream (§5).

It validates, publishes and answers; it never answers 202 for a message JetStream has not
stored. What topics exist it learns from the consumer through the `gitfaas_config` key-value
bucket (watched, so the hot path reads memory, not NATS).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from aiohttp import web
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import Error as JetStreamError
from nats.js.kv import KeyValue
from prometheus_client import Counter, Histogram

from bridge.deadletters import DeadLetterRoutes
from bridge.runs import RunRoutes
from bridge.stats import StatsRoutes
from bridge.ui import UI_ROUTES, Dashboard
from bridge.watch import WatchRoutes
from gitfaas import natsconn, safejson
from gitfaas.httperrors import JsonErrorsRunner, error_answer
from gitfaas.logs import get_logger
from gitfaas.message import request_headers
from gitfaas.metrics import json_error, metrics_view
from gitfaas.publishing import (
    NO_CONFIGURATION,
    WAITS,
    ConfigurationView,
    content_type_refusal,
    declares_json,
    too_large,
    wait_status,
)
from gitfaas.replay import ReplayError, ReplayTooLarge, replay_request, stored_message
from gitfaas.runs import RunStore, ensure_runs_bucket, is_run_finished, rfc3339, run_view
from gitfaas.schedules import next_tick
from gitfaas.settings import Settings
from gitfaas.status import StatusStore, StatusTooLarge, request_key_of_function, set_response
from gitfaas.subjects import (
    CONFIG_KEY,
    HEADER_PARENT,
    InvalidName,
    Subjects,
    check_topic,
)

log = get_logger("gitfaas.bridge")

PUBLISHES = Counter("gitfaas_bridge_publishes_total", "Publish requests answered, by topic and HTTP code",
                    ["topic", "code"])
PUBLISH_SECONDS = Histogram("gitfaas_bridge_publish_seconds", "Time from request to JetStream ack",
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))

# Query parameters that steer the bridge itself rather than becoming template variables.
RESERVED_QUERY = frozenset({"wait", "timeout", "parent"})
# The dashboard's files hold no data: the page loads, then asks for the token (bridge/ui.py).
OPEN_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", *UI_ROUTES})
PUBLISH_TIMEOUT_SECONDS = 5.0
DEFAULT_WAIT_SECONDS = 30.0
MAX_WAIT_SECONDS = 300.0
REFRESH_TIMEOUT_SECONDS = 60.0
NATS_UNAVAILABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    asyncio.TimeoutError,
    JetStreamError,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NOT_A_REQUEST_ID = ("not a request id: request ids are 1 to 128 letters, digits, '-' or '_', "
                    "starting with a letter or digit")


async def read_limited(request: web.Request, limit: int) -> bytes | None:
    """The body, or None as soon as more than `limit` bytes have arrived.

    Enforced while reading (a chunked upload has no Content-Length to check first): never more than
    `limit` + 1 bytes are read into the body, whatever the client goes on sending. (aiohttp's own
    `client_max_size` behaves alike in `request.read()`; this does not depend on that setting.)
    """
    body = bytearray()
    while chunk := await request.content.read(min(65536, limit + 1 - len(body))):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


class Bridge:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.subject_prefix)
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.config_state: dict[str, Any] | None = None
        self.configuration = ConfigurationView(None)  # what a publish is checked against, from config_state
        self._topics: frozenset[str] = frozenset()
        self._config_kv: KeyValue | None = None
        self.status: StatusStore | None = None
        self.runs: RunStore | None = None  # the run index (§11)
        self.run_routes = RunRoutes(self)
        self.dashboard_routes = (DeadLetterRoutes(self), StatsRoutes(self), WatchRoutes(self), Dashboard())
        self._watch_task: asyncio.Task[None] | None = None
        self._token = (settings.bridge_token or "").encode()
        self._stopping = False
        self._reestablishing: asyncio.Task[None] | None = None
        self.reconnects = 0  # connections re-established after NATS closed one

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        await self._connect()

    async def _connect(self) -> None:
        nc = await natsconn.connect(self.settings, "gitfaas-bridge", reconnected_cb=self._on_reconnected,
                                    closed_cb=self._on_closed)
        try:
            js = nc.jetstream(timeout=PUBLISH_TIMEOUT_SECONDS)
            self._config_kv, requests_kv = await natsconn.ensure_all(js, self.settings)
        except BaseException:
            await nc.close()
            raise
        try:
            runs_kv = await ensure_runs_bucket(js, self.settings)
        except BaseException:
            await nc.close()
            raise
        self.nc, self.js = nc, js
        self.status = StatusStore(requests_kv, max_bytes=nc.max_payload)
        self.runs = RunStore(runs_kv, nc, max_bytes=nc.max_payload)
        self._start_watch()

    async def _on_closed(self) -> None:
        """NATS closed the connection for good (the client does not reconnect after a protocol error):
        make a new one. Meanwhile publishing answers 503 and /readyz says NATS is closed."""
        if self._stopping or self.nc is None or not self.nc.is_closed:
            return
        if self._reestablishing is None or self._reestablishing.done():
            log.error("nats connection closed, re-establishing it", error=str(self.nc.last_error or "closed"))
            self._reestablishing = asyncio.create_task(self._reestablish(), name="bridge-nats-reestablish")

    async def _reestablish(self) -> None:
        delay = 0.5
        while not self._stopping:
            try:
                await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — keep trying; /readyz says NATS is unavailable
                log.error("nats connection not re-established, retrying", error=str(exc) or type(exc).__name__,
                          in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self.reconnects += 1
            log.info("nats connection re-established")
            return

    async def stop(self) -> None:
        self._stopping = True
        if self._reestablishing is not None:
            self._reestablishing.cancel()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()

    async def _on_reconnected(self) -> None:
        log.info("nats reconnected")
        self._start_watch()  # the server may have lost the watch's ephemeral consumer

    def _start_watch(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        self._watch_task = asyncio.create_task(self._watch_config(), name="bridge-config-watch")

    async def _watch_config(self) -> None:
        assert self._config_kv is not None
        while True:
            try:
                watcher = await self._config_kv.watch(CONFIG_KEY)
                async for entry in watcher:
                    if entry is not None and entry.value:
                        self._set_state(json.loads(entry.value))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — keep the last state, watch again shortly
                log.warning("configuration watch failed, retrying", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(1.0)

    def _set_state(self, state: dict[str, Any]) -> None:
        self.config_state = state
        self.configuration = ConfigurationView(state)
        self._topics = frozenset(self.configuration.topics)

    # ---- application -----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.max_payload_bytes,
            # No token, no auth layer: one less coroutine on every request of the hot path.
            middlewares=[self._errors_middleware, *([self._auth_middleware] if self._token else [])],
        )
        app.router.add_post("/publish/{topic}", self.publish)
        app.router.add_get("/requests/{request_id}", self.request_status)
        app.router.add_post("/requests/{request_id}/replay", self.replay)
        app.router.add_post("/response/{function_uid}", self.post_response)
        app.router.add_get("/response/{request_id}", self.get_responses)
        app.router.add_get("/topics", self.topics)
        app.router.add_route("GET", "/refresh", self.refresh)
        app.router.add_route("POST", "/refresh", self.refresh)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", metrics_view)
        self.run_routes.add(app)
        for routes in self.dashboard_routes:
            routes.add(app)
        return app

    @web.middleware
    async def _errors_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error is JSON with a sentence, including aiohttp's own (404 route, 405, 413)."""
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, too_large(self.settings.max_payload_bytes))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return json_error(exc.status, exc.reason or "error")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a JSON sentence, not aiohttp's text/plain page
            log.exception("request failed", path=request.path[:200])
            return error_answer(exc)

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """`BRIDGE_TOKEN`: every route but health, readiness and metrics needs `Authorization: Bearer`.

        Open or not is decided by the route the router matched, not by the path text, and the token
        is compared in constant time.
        """
        if not self._token:
            return await handler(request)
        resource = request.match_info.route.resource
        if resource is not None and resource.canonical in OPEN_ROUTES:
            return await handler(request)
        scheme, _, credential = request.headers.get("Authorization", "").strip().partition(" ")
        given = hashlib.sha256(credential.strip().encode("utf-8", errors="replace")).digest()
        if not hmac.compare_digest(given, hashlib.sha256(self._token).digest()) or scheme.lower() != "bearer":
            response = json_error(401, "missing or wrong bearer token (Authorization: Bearer <BRIDGE_TOKEN>)")
            response.headers["WWW-Authenticate"] = 'Bearer realm="gitfaas"'
            return response
        return await handler(request)

    # ---- routes ----------------------------------------------------------------------------

    async def publish(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        topic = request.match_info["topic"]
        response = await self._publish(request, topic)
        label = topic if topic in self._topics else "-"
        PUBLISHES.labels(label, str(response.status)).inc()
        if response.status == 202:
            PUBLISH_SECONDS.observe(time.perf_counter() - started)
        return response

    async def _publish(self, request: web.Request, topic: str) -> web.Response:
        try:
            check_topic(topic)
        except InvalidName as exc:
            return json_error(400, str(exc))
        wait = request.query.get("wait")
        if wait is not None and wait not in (*WAITS, "run"):
            return json_error(400, f"wait must be {', '.join(repr(w) for w in WAITS)} or 'run'")
        wait_timeout = self.wait_timeout(request)
        if isinstance(wait_timeout, web.Response):
            return wait_timeout
        if self.nc is None or self.js is None or not self.nc.is_connected:
            return json_error(503, "NATS is unavailable; the message was not accepted")
        params = [(k, v) for k, v in request.query.items() if k not in RESERVED_QUERY]
        # No configuration yet, an unknown topic, or a parameter that no value and no default gives.
        refusal = self.configuration.refusal(topic, {name for name, _ in params})
        if refusal is not None:
            return json_error(refusal.status, refusal.error)
        content_type = request.content_type if request.headers.get("Content-Type") else ""
        refused_type = content_type_refusal(content_type)
        if refused_type is not None:
            return json_error(415, refused_type)
        limit = self.settings.max_payload_bytes
        if request.content_length is not None and request.content_length > limit:
            return json_error(413, too_large(limit))
        body = await read_limited(request, limit)
        if body is None:
            return json_error(413, too_large(limit))
        if declares_json(content_type):
            try:
                safejson.loads(body or b"null")  # nested at most MAX_JSON_DEPTH levels, as the consumer reads it
            except (ValueError, UnicodeDecodeError) as exc:
                return json_error(400, f"body is not valid JSON: {exc}")

        request_id = str(uuid.uuid4())
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
        if natsconn.wire_size(body, {**headers, "Nats-Expected-Stream": self.settings.stream}) > self.nc.max_payload:
            return json_error(413, f"the message (body and headers) is larger than NATS accepts "
                                   f"({self.nc.max_payload} bytes)")

        try:
            ack = await self.js.publish(self.subjects.topic(topic), body, headers=headers,
                                        stream=self.settings.stream, timeout=PUBLISH_TIMEOUT_SECONDS)
        except NATS_UNAVAILABLE as exc:
            log.warning("publish not stored", topic=topic, error=str(exc) or type(exc).__name__)
            return json_error(503, "JetStream did not store the message; it was not accepted: "
                                   f"{type(exc).__name__}")
        if ack.duplicate:
            request_id = await self._original_request_id(ack.seq) or request_id
        answer = {"request_id": request_id, "topic": topic, "stream_seq": ack.seq, "duplicate": bool(ack.duplicate)}
        if wait is None:
            return web.json_response(answer, status=202)
        return await self._wait(answer, wait, wait_timeout)

    def wait_timeout(self, request: web.Request) -> float | web.Response:
        """`?timeout=S` of a wait, or the error answer."""
        try:
            timeout = float(request.query.get("timeout", DEFAULT_WAIT_SECONDS))
        except ValueError:
            return json_error(400, "timeout must be a number of seconds")
        if not 0 < timeout <= MAX_WAIT_SECONDS:
            return json_error(400, f"timeout must be between 0 and {MAX_WAIT_SECONDS:.0f} seconds")
        return timeout

    async def _wait_run(self, answer: dict[str, Any], timeout: float) -> web.Response:
        """`?wait=run`: until the run this request belongs to is finished (§11)."""
        assert self.status is not None and self.runs is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:  # the run is known once the consumer has claimed the request (its `root`)
            known, document = await self.status.wait(answer["request_id"], lambda d: bool(d.get("root")), timeout)
            if not known or document is None:
                return web.json_response({**answer, "state": (document or {}).get("state", "pending")}, status=504)
            reached, run = await self.runs.wait(document["root"], is_run_finished, max(0.001, deadline - loop.time()))
            if run is None:
                return web.json_response({**answer, "run_id": document["root"], "state": "running"}, status=504)
            view = await run_view(self.status, run)
        except NATS_UNAVAILABLE as exc:
            return json_error(503, f"accepted as {answer['request_id']}, but its status is unavailable: "
                                   f"{type(exc).__name__}")
        return web.json_response(view, status=wait_status(reached, view))

    async def _wait(self, answer: dict[str, Any], wait: str, timeout: float) -> web.Response:
        """`?wait=`: answer from a watch of the request's status key, not by polling."""
        assert self.status is not None
        if wait == "run":
            return await self._wait_run(answer, timeout)
        try:
            reached, document = await self.status.wait(answer["request_id"], WAITS[wait], timeout)
        except NATS_UNAVAILABLE as exc:
            return json_error(503, f"accepted as {answer['request_id']}, but its status is unavailable: "
                                   f"{type(exc).__name__}")
        if document is None:
            document = {**answer, "state": "pending"}
        # 200 reached; 422 the request ended failed, dead or cancelled; 504 still on its way.
        return web.json_response(document, status=wait_status(reached, document))

    async def _original_request_id(self, seq: int) -> str | None:
        """A duplicate publish answers with the first request's id, read back from the stream."""
        assert self.js is not None
        try:
            original = await stored_message(self.js, self.settings.stream, seq)
        except (*NATS_UNAVAILABLE, ReplayError):
            return None
        return original.request_id  # as the consumer sees it: its own if valid, else seq-<n>

    async def _status_document(self, request_id: str) -> dict[str, Any] | web.Response:
        """The request's status document (by id, or a unique prefix of at least 8 characters), or the
        error response that says why there is none."""
        try:
            found = await self.run_routes.find(request_id)
        except NATS_UNAVAILABLE:
            return json_error(503, "the status store is unavailable")
        return found if isinstance(found, web.Response) else found.document

    async def request_status(self, request: web.Request) -> web.Response:
        document = await self._status_document(request.match_info["request_id"])
        return document if isinstance(document, web.Response) else web.json_response(document)

    async def replay(self, request: web.Request) -> web.Response:
        found = await self.run_routes.find(request.match_info["request_id"])
        if isinstance(found, web.Response):
            return found
        request_id = found.request_id
        if self.status is None or self.js is None or self.nc is None or not self.nc.is_connected:
            return json_error(503, "NATS is unavailable")
        try:
            republished = await replay_request(self.js, self.status, self.settings, request_id)
        except ReplayTooLarge as exc:
            return json_error(413, str(exc))
        except ReplayError as exc:
            return json_error(404, str(exc))
        except NATS_UNAVAILABLE as exc:
            return json_error(503, f"JetStream did not store the replay: {type(exc).__name__}")
        return web.json_response({**republished.as_dict(), "duplicate": False}, status=202)

    async def post_response(self, request: web.Request) -> web.Response:
        """A function stores its result under its FUNCTION_UID (text, or JSON when declared)."""
        function_uid = request.match_info["function_uid"]
        if self.status is None or self.nc is None or not self.nc.is_connected:
            return json_error(503, "NATS is unavailable")
        body = await request.read()
        value: Any
        if request.content_type == "application/json" or request.content_type.endswith("+json"):
            try:
                value = safejson.loads(body or b"null")
            except (ValueError, UnicodeDecodeError) as exc:
                return json_error(400, f"body is not valid JSON: {exc}")
        else:
            value = body.decode("utf-8", errors="replace")
        stored: list[bool] = []
        document = None
        key = request_key_of_function(function_uid)
        try:
            if key is not None:  # the uid must match its document exactly: a forged one stores nothing
                document = await self.status.update(key, lambda d: stored.append(set_response(d, function_uid, value)))
        except NATS_UNAVAILABLE:
            return json_error(503, "the status store is unavailable")
        except StatusTooLarge:
            return json_error(413, "the request's status cannot hold this response: with it, the document "
                                   "would be larger than NATS accepts")
        if document is None or not any(stored):
            shown = f" {function_uid}" if key is not None else ""  # quoted only once it has the right form
            return json_error(404, f"function uid{shown} is unknown (or its request has expired)")
        return web.json_response({"request_id": document["request_id"], "function_uid": function_uid,
                                  "stored": True})

    async def get_responses(self, request: web.Request) -> web.Response:
        document = await self._status_document(request.match_info["request_id"])
        if isinstance(document, web.Response):
            return document
        responses = list(document.get("responses", []))
        responses.extend([None] * (len(document.get("documents", [])) - len(responses)))
        return web.json_response({"responses": responses})

    async def topics(self, _request: web.Request) -> web.Response:
        if self.config_state is None:
            return web.json_response({"commit": None, "loaded_at": None, "topics": [],
                                      "error": NO_CONFIGURATION})
        return web.json_response(with_next_ticks(self.config_state))

    async def refresh(self, _request: web.Request) -> web.Response:
        if self.nc is None or not self.nc.is_connected:
            return json_error(503, "NATS is unavailable")
        try:
            reply = await self.nc.request(self.subjects.refresh, b"", timeout=REFRESH_TIMEOUT_SECONDS)
        except nats.errors.NoRespondersError:
            return json_error(503, "no consumer is running to refresh the repository")
        except (TimeoutError, nats.errors.TimeoutError):
            return json_error(504, f"the consumer did not finish refreshing within {REFRESH_TIMEOUT_SECONDS}s")
        state = json.loads(reply.data)
        self._set_state(state)
        return web.json_response(state)

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        connected = bool(self.nc and self.nc.is_connected)
        stream_ok = False
        if connected and self.js is not None:
            try:
                await self.js.stream_info(self.settings.stream)
                stream_ok = True
            except NATS_UNAVAILABLE:
                stream_ok = False
        commit = (self.config_state or {}).get("commit")
        ready = connected and stream_ok and bool(commit)
        detail = {"ready": ready, "nats": "connected" if connected else "disconnected",
                  "stream": self.settings.stream if stream_ok else None, "configuration": commit,
                  "error": (self.config_state or {}).get("error")}  # a refused commit, while the last good one serves
        return web.json_response(detail, status=200 if ready else 503)


def with_next_ticks(state: dict[str, Any]) -> dict[str, Any]:
    """The configuration state with each schedule's next tick (computed now, §11)."""
    topics = []
    for topic in state.get("topics") or []:
        if isinstance(topic, dict) and topic.get("schedule"):
            try:
                tick: str | None = rfc3339(next_tick(topic["schedule"], topic.get("timezone"), time.time()))
            except (ValueError, KeyError, TypeError):
                tick = None
            topic = {**topic, "next_tick": tick}
        topics.append(topic)
    return {**state, "topics": topics}


async def serve(bridge: Bridge, host: str, port: int) -> web.AppRunner:
    """Start the HTTP server; the caller cleans the returned runner up."""
    runner = JsonErrorsRunner(bridge.app(), access_log=None)  # parser errors answered in JSON too
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def run(settings: Settings) -> None:
    """`gitfaas bridge`: run until SIGTERM/SIGINT."""
    bridge = Bridge(settings)
    await bridge.start()
    runner = await serve(bridge, settings.bridge_host, settings.bridge_port)
    log.info("bridge listening", host=settings.bridge_host, port=settings.bridge_port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await bridge.stop()
