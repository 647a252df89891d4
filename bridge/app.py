"""The bridge: a thin, stateless HTTP edge in front of JetStream (§5, §11).

It validates, publishes and answers; it never answers 202 for a message JetStream has not
stored. What topics exist it learns from the consumer through the `gitfaas_config` key-value
bucket (watched, so the hot path reads memory, not NATS).

This module holds the `Bridge` (its NATS connection and the configuration it watches), the one app
factory (`Bridge.app`: error and token middlewares, then each group of routes), health and
readiness, and the server. The routes live in modules of their own, each a class with `add(app)`:

- `bridge.publish`: `POST /publish/{topic}` and its waits;
- `bridge.requests`: `/requests/{id}`, its replay, and `/response/…`;
- `bridge.runs`: `/runs…`, cancel, and `/requests/{id}/logs`;
- `bridge.topics`: `/topics` and `/refresh`;
- `bridge.deadletters`, `bridge.stats`, `bridge.watch`: what the dashboard reads and does;
- `bridge.ui`: the dashboard's files at `/` and `/ui/…`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from bridge.deadletters import DeadLetterRoutes
from bridge.publish import PUBLISH_TIMEOUT_SECONDS, PublishRoutes
from bridge.requests import RequestRoutes
from bridge.runs import RunRoutes
from bridge.stats import StatsRoutes
from bridge.topics import TopicRoutes
from bridge.ui import UI_ROUTES, Dashboard
from bridge.unavailable import NATS_UNAVAILABLE
from bridge.watch import WatchRoutes
from gitfaas import natsconn
from gitfaas.httperrors import JsonErrorsRunner, error_answer
from gitfaas.jspublish import AckedPublisher
from gitfaas.logs import get_logger
from gitfaas.metrics import json_error, metrics_view
from gitfaas.publishing import ConfigurationView, too_large
from gitfaas.runs import RunStore, ensure_runs_bucket
from gitfaas.settings import Settings
from gitfaas.status import StatusStore
from gitfaas.subjects import CONFIG_KEY, Subjects

log = get_logger("gitfaas.bridge")

# The dashboard's files hold no data: the page loads, then asks for the token (bridge/ui.py).
OPEN_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", *UI_ROUTES})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Bridge:
    """One bridge: its NATS connection (re-established if NATS closes it), the configuration it
    watches, and the stores its routes read."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.subject_prefix)
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.publisher: AckedPublisher | None = None  # the hot path's publishes (gitfaas/jspublish.py)
        self.config_state: dict[str, Any] | None = None
        self.configuration = ConfigurationView(None)  # what a publish is checked against, from config_state
        self.known_topics: frozenset[str] = frozenset()  # the configured topics (a metric's label values)
        self._config_kv: KeyValue | None = None
        self.status: StatusStore | None = None
        self.runs: RunStore | None = None  # the run index (§11)
        self.run_routes = RunRoutes(self)  # (the other routes find requests and runs through it)
        self.publish_routes = PublishRoutes(self)
        self.routes = (self.publish_routes, RequestRoutes(self), self.run_routes, TopicRoutes(self),
                       DeadLetterRoutes(self), StatsRoutes(self), WatchRoutes(self), Dashboard())
        self._watch_task: asyncio.Task[None] | None = None
        self._token = (settings.bridge_token or "").encode()
        self._token_digest = hashlib.sha256(self._token).digest()
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
            publisher = AckedPublisher(nc, self.settings.stream, PUBLISH_TIMEOUT_SECONDS)
            await publisher.start()
        except BaseException:
            await nc.close()
            raise
        if self.publisher is not None:  # the one of a connection NATS closed
            await self.publisher.close()
        self.nc, self.js, self.publisher = nc, js, publisher
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
        if self.publisher is not None:
            await self.publisher.close()
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
                        self.set_state(json.loads(entry.value))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — keep the last state, watch again shortly
                log.warning("configuration watch failed, retrying", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(1.0)

    def set_state(self, state: dict[str, Any]) -> None:
        """The configuration the consumer loaded (from the watch, or the answer to a refresh)."""
        self.config_state = state
        self.configuration = ConfigurationView(state)
        self.known_topics = frozenset(self.configuration.topics)

    # ---- application -----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.max_payload_bytes,
            # No token, no auth layer: one less coroutine on every request of the hot path.
            middlewares=[self._errors_middleware, *([self._auth_middleware] if self._token else [])],
        )
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", metrics_view)
        for routes in self.routes:
            routes.add(app)
        return app

    @web.middleware
    async def _errors_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        return await self.guarded(request, handler)

    async def guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error is JSON with a sentence, including aiohttp's own (404 route, 405, 413)."""
        try:
            return await handler(request)
        except Exception as exc:  # noqa: BLE001 — every error a JSON answer (CancelledError goes on up)
            return self.error_answer(request, exc)

    def error_answer(self, request: web.Request, exc: Exception) -> web.StreamResponse:
        if isinstance(exc, web.HTTPRequestEntityTooLarge):
            return json_error(413, too_large(self.settings.max_payload_bytes))
        if isinstance(exc, web.HTTPException):
            if exc.status < 400:
                raise exc
            return json_error(exc.status, exc.reason or "error")
        log.exception("request failed", path=request.path[:200], exc_info=exc)  # a JSON sentence, not a text page
        return error_answer(exc)

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """`BRIDGE_TOKEN`: every route but health, readiness and metrics needs `Authorization: Bearer`.

        Open or not is decided by the route the router matched, not by the path text.
        """
        resource = request.match_info.route.resource
        if resource is not None and resource.canonical in OPEN_ROUTES:
            return await handler(request)
        return self.refused(request) or await handler(request)

    def refused(self, request: web.Request) -> web.Response | None:
        """The 401 answer when a token is set and the request does not carry it (compared in constant time)."""
        if not self._token:
            return None
        scheme, _, credential = request.headers.get("Authorization", "").strip().partition(" ")
        given = hashlib.sha256(credential.strip().encode("utf-8", errors="replace")).digest()
        if hmac.compare_digest(given, self._token_digest) and scheme.lower() == "bearer":
            return None
        response = json_error(401, "missing or wrong bearer token (Authorization: Bearer <BRIDGE_TOKEN>)")
        response.headers["WWW-Authenticate"] = 'Bearer realm="gitfaas"'
        return response

    # ---- health ----------------------------------------------------------------------------

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


WORKER_CONFIG_WAIT_SECONDS = 10.0  # no configuration yet (a new deployment): listen anyway, as one bridge does


# `POST /publish/<topic>` is the hot path (issue 17): the bridge answers it before aiohttp's router and
# middleware chain, which took ~12% of a publish's CPU, with the same checks in the same order (errors
# as JSON, the token, then the route). Only a plain path takes this way; anything else (percent-escapes,
# a trailing slash, `Expect: 100-continue`, which the router's expect handler answers) goes through the
# application as before, so both ways give the same answers.
_DIRECT_PUBLISH = re.compile(r"/publish/([A-Za-z0-9_.-]+)(?:\?.*)?", re.S)


def direct_publish(bridge: Bridge, through_app: Handler) -> Handler:
    """The server's request handler: `POST /publish/<topic>` straight to the publish route, the rest to the app."""
    publish = bridge.publish_routes

    async def handle(request: web.Request) -> web.StreamResponse:
        match = _DIRECT_PUBLISH.fullmatch(request.raw_path) if request.method == "POST" else None
        if match is None or "Expect" in request.headers:
            return await through_app(request)
        try:  # as `guarded`, the token middleware and the route would, without three more coroutines
            refused = bridge.refused(request)
            if refused is not None:
                return refused
            started = time.perf_counter()
            return publish.counted(match[1], await publish.respond(request, match[1]), started)
        except Exception as exc:  # noqa: BLE001 — as in `guarded`
            return bridge.error_answer(request, exc)

    return handle


async def serve(bridge: Bridge, host: str, port: int, reuse_port: bool = False) -> web.AppRunner:
    """Start the HTTP server; the caller cleans the returned runner up.

    `reuse_port`: a worker of several on one port (SO_REUSEPORT, `bridge/workers.py`)."""
    runner = JsonErrorsRunner(bridge.app(), access_log=None)  # parser errors answered in JSON too
    await runner.setup()
    assert runner.server is not None
    runner.server.request_handler = direct_publish(bridge, runner.server.request_handler)
    await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
    return runner


async def run(settings: Settings, worker: bool = False) -> None:
    """`gitfaas bridge`: run until SIGTERM/SIGINT; with BRIDGE_WORKERS > 1, supervise that many workers."""
    if settings.bridge_workers > 1 and not worker:
        from bridge.workers import supervise

        await supervise(settings)
        return
    follower = None
    if worker:  # started by bridge/workers.py: stop when the supervisor is gone
        from bridge.workers import follow_supervisor

        follower = asyncio.create_task(follow_supervisor(os.getppid()), name="bridge-follow-supervisor")
    bridge = Bridge(settings)
    await bridge.start()
    if worker:  # a replacement worker takes connections once it knows the topics its siblings know
        for _ in range(int(WORKER_CONFIG_WAIT_SECONDS / 0.02)):
            if bridge.config_state is not None:
                break
            await asyncio.sleep(0.02)
    runner = await serve(bridge, settings.bridge_host, settings.bridge_port, reuse_port=worker)
    log.info("bridge listening", host=settings.bridge_host, port=settings.bridge_port, worker=worker)
    try:
        await asyncio.Event().wait()
    finally:
        log.info("bridge stopping: finishing the requests in flight")
        if follower is not None:
            follower.cancel()
        await runner.cleanup()
        await bridge.stop()
