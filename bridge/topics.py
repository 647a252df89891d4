"""The configuration the consumer loaded, as the bridge sees it (§5): `GET /topics`, and `/refresh`,
which asks a consumer to pull git now (`gitfaas.control.refresh`)."""

from __future__ import annotations

import json
import time
from typing import Any

import nats.errors
from aiohttp import web

from gitfaas.metrics import json_error
from gitfaas.publishing import NO_CONFIGURATION
from gitfaas.runs import rfc3339
from gitfaas.schedules import next_tick

REFRESH_TIMEOUT_SECONDS = 60.0


class TopicRoutes:
    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge  # bridge.app.Bridge (not imported: it imports this module)

    def add(self, app: web.Application) -> None:
        app.router.add_get("/topics", self.topics)
        app.router.add_route("GET", "/refresh", self.refresh)
        app.router.add_route("POST", "/refresh", self.refresh)

    async def topics(self, _request: web.Request) -> web.Response:
        if self.bridge.config_state is None:
            return web.json_response({"commit": None, "loaded_at": None, "topics": [],
                                      "error": NO_CONFIGURATION})
        return web.json_response(with_next_ticks(self.bridge.config_state))

    async def refresh(self, _request: web.Request) -> web.Response:
        if self.bridge.nc is None or not self.bridge.nc.is_connected:
            return json_error(503, "NATS is unavailable")
        try:
            reply = await self.bridge.nc.request(self.bridge.subjects.refresh, b"", timeout=REFRESH_TIMEOUT_SECONDS)
        except nats.errors.NoRespondersError:
            return json_error(503, "no consumer is running to refresh the repository")
        except (TimeoutError, nats.errors.TimeoutError):
            return json_error(504, f"the consumer did not finish refreshing within {REFRESH_TIMEOUT_SECONDS}s")
        state = json.loads(reply.data)
        self.bridge.set_state(state)
        return web.json_response(state)


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
