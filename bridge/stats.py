"""`GET /stats`: the live counts the dashboard's overview shows, read from JetStream.

`{"in_flight": n, "pending": n, "redelivered": n, "dead_letters": n, "stream_messages": n}`:
messages handed to a consumer and not yet acknowledged, messages stored and not yet handed to any,
messages delivered more than once, dead letters waiting, and messages kept in the stream (for replay).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from nats.js.errors import NotFoundError

from gitfaas.metrics import json_error


class StatsRoutes:
    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge  # bridge.app.Bridge (not imported: it imports this module)

    def add(self, app: web.Application) -> None:
        app.router.add_get("/stats", self.stats)

    async def stats(self, _request: web.Request) -> web.Response:
        b = self.bridge
        if b.js is None or b.nc is None or not b.nc.is_connected:
            return json_error(503, "NATS is unavailable")
        settings = b.settings
        counts: dict[str, int | None] = {"in_flight": None, "pending": None, "redelivered": None}
        try:
            consumer = await b.js.consumer_info(settings.stream, settings.durable)
        except NotFoundError:  # no consumer has started yet: nothing was handed out
            pass
        else:
            counts.update(in_flight=consumer.num_ack_pending or 0, pending=consumer.num_pending or 0,
                          redelivered=consumer.num_redelivered or 0)
        stream = await b.js.stream_info(settings.stream)
        dead = await b.js.stream_info(settings.dead_stream)
        counts.update(dead_letters=dead.state.messages or 0, stream_messages=stream.state.messages or 0)
        return web.json_response(counts)
