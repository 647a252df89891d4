"""Live views for the dashboard: server-sent events driven by changes in NATS, never by a timer.

- `GET /watch/runs?topic=&state=&limit=`: event `runs`, `{"runs": [...]}` as `GET /runs` answers it,
  again each time a run changes;
- `GET /watch/runs/{id}`: event `run`, the run as `GET /runs/{id}` answers it, again each time it or
  one of its requests changes.

A stream learns of a change from a plain NATS subscription on the key-value subjects of the runs
bucket (and, for one run, of its requests' status keys): no JetStream consumer per viewer, and nothing
is read while nothing changes. A burst of changes is sent as one event, at most one a second (one every
few seconds for a run of hundreds of requests); an event identical to the last one is not sent. A
comment line every 15 s keeps proxies from closing an idle stream and finds viewers that went away.

The routes are ordinary authenticated GETs, so with `BRIDGE_TOKEN` set the page reads them with
`fetch` and an `Authorization` header (an `EventSource` cannot send one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from bridge.runs import id_error, run_filter
from gitfaas.logs import get_logger
from gitfaas.metrics import json_error
from gitfaas.runs import (
    RUNS_BUCKET,
    AmbiguousId,
    UnknownId,
    find_run,
    run_key,
    run_view,
)
from gitfaas.status import is_request_id
from gitfaas.subjects import REQUESTS_BUCKET

log = get_logger("gitfaas.bridge.watch")

MIN_INTERVAL_SECONDS = 1.0  # at most one event a second per stream
HEARTBEAT_SECONDS = 15.0
MAX_WATCHED_REQUESTS = 500  # status keys one run stream subscribes to; beyond, the run's own key says enough
Compute = Callable[[], Awaitable[tuple[str, dict[str, Any]]]]


class WatchRoutes:
    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge  # bridge.app.Bridge (not imported: it imports this module)
        self._closing = asyncio.Event()

    def add(self, app: web.Application) -> None:
        self._closing = asyncio.Event()
        app.router.add_get("/watch/runs", self.watch_runs)
        app.router.add_get("/watch/runs/{run_id}", self.watch_run)
        app.on_shutdown.append(self.close)

    async def close(self, _app: web.Application | None = None) -> None:
        """Open streams end (the server's shutdown would otherwise wait for them)."""
        self._closing.set()

    def _unavailable(self) -> web.Response | None:
        b = self.bridge
        if b.status is None or b.runs is None or b.nc is None or not b.nc.is_connected:
            return json_error(503, "NATS is unavailable")
        return None

    async def watch_runs(self, request: web.Request) -> web.StreamResponse:
        if (down := self._unavailable()) is not None:
            return down
        wanted = run_filter(request)
        if isinstance(wanted, web.Response):
            return wanted

        async def compute() -> tuple[str, dict[str, Any]]:
            runs = await self.bridge.run_routes.listing().list(**wanted)
            return "runs", {"runs": runs}

        return await self._stream(request, compute, lambda: {f"$KV.{RUNS_BUCKET}.run.>"})

    async def watch_run(self, request: web.Request) -> web.StreamResponse:
        given = request.match_info["run_id"]
        if not is_request_id(given):
            return json_error(400, "not a run id")
        if (down := self._unavailable()) is not None:
            return down
        b = self.bridge
        try:
            run = await find_run(b.status, b.runs, given)
        except (UnknownId, AmbiguousId) as exc:
            return id_error(exc)
        run_id = str(run["run_id"])
        request_ids: list[str] = list(run.get("requests") or {})
        pace = [MIN_INTERVAL_SECONDS]

        async def compute() -> tuple[str, dict[str, Any]]:
            current = await b.runs.get(run_id) or run
            request_ids[:] = list(current.get("requests") or {})
            pace[0] = max(MIN_INTERVAL_SECONDS, len(request_ids) / 100)
            return "run", await run_view(b.status, current)

        def subjects() -> set[str]:
            keys = {f"$KV.{REQUESTS_BUCKET}.{rid}" for rid in request_ids[:MAX_WATCHED_REQUESTS]}
            return {f"$KV.{RUNS_BUCKET}.{run_key(run_id)}", *keys}

        return await self._stream(request, compute, subjects, pace)

    async def _stream(self, request: web.Request, compute: Compute, subjects: Callable[[], set[str]],
                      pace: list[float] | None = None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        changed = asyncio.Event()
        changed.set()  # the first event at once
        subscriptions: dict[str, Any] = {}
        connection: Any = None
        last_payload: bytes | None = None
        last_sent = 0.0

        async def on_change(_msg: Any) -> None:
            changed.set()

        closing = asyncio.ensure_future(self._closing.wait())
        try:
            while not self._closing.is_set():
                nc = self.bridge.nc
                if nc is not connection:  # a new connection (re-established): subscribe again
                    subscriptions.clear()
                    connection = nc
                    changed.set()
                if nc is not None and nc.is_connected:
                    for subject in subjects() - subscriptions.keys():
                        subscriptions[subject] = await nc.subscribe(subject, cb=on_change)
                waiter = asyncio.ensure_future(changed.wait())
                done, _ = await asyncio.wait({waiter, closing}, timeout=HEARTBEAT_SECONDS,
                                             return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if closing in done:
                    break
                if not done:
                    await response.write(b": still here\n\n")
                    continue
                # Coalesce a burst: at most one event per interval.
                delay = last_sent + (pace[0] if pace else MIN_INTERVAL_SECONDS) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                changed.clear()
                try:
                    event, data = await compute()
                except Exception as exc:  # noqa: BLE001 — NATS away for a moment: say so, try at the next change
                    log.warning("live view not computed", error=str(exc) or type(exc).__name__)
                    await response.write(b"event: unavailable\ndata: {}\n\n")
                    last_sent = time.monotonic()
                    continue
                payload = f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
                if payload != last_payload:
                    await response.write(payload)
                    last_payload = payload
                last_sent = time.monotonic()
        except ConnectionError:
            pass  # the viewer went away
        finally:
            closing.cancel()
            for subscription in subscriptions.values():
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
        return response
