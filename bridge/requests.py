"""A request's routes (§5): its status document, replaying it, and the functions' responses.

Ids may be a unique prefix of at least 8 characters (`RunRoutes.find`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from bridge.unavailable import NATS_UNAVAILABLE
from gitfaas import safejson
from gitfaas.metrics import json_error
from gitfaas.replay import ReplayError, ReplayTooLarge, replay_request
from gitfaas.status import StatusTooLarge, request_key_of_function, set_response


class RequestRoutes:
    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge  # bridge.app.Bridge (not imported: it imports this module)

    def add(self, app: web.Application) -> None:
        app.router.add_get("/requests/{request_id}", self.request_status)
        app.router.add_post("/requests/{request_id}/replay", self.replay)
        app.router.add_post("/response/{function_uid}", self.post_response)
        app.router.add_get("/response/{request_id}", self.get_responses)

    async def _status_document(self, request_id: str) -> dict[str, Any] | web.Response:
        """The request's status document (by id, or a unique prefix of at least 8 characters), or the
        error response that says why there is none."""
        try:
            found = await self.bridge.run_routes.find(request_id)
        except NATS_UNAVAILABLE:
            return json_error(503, "the status store is unavailable")
        return found if isinstance(found, web.Response) else found.document

    async def request_status(self, request: web.Request) -> web.Response:
        document = await self._status_document(request.match_info["request_id"])
        return document if isinstance(document, web.Response) else web.json_response(document)

    async def replay(self, request: web.Request) -> web.Response:
        found = await self.bridge.run_routes.find(request.match_info["request_id"])
        if isinstance(found, web.Response):
            return found
        request_id = found.request_id
        b = self.bridge
        if b.status is None or b.js is None or b.nc is None or not b.nc.is_connected:
            return json_error(503, "NATS is unavailable")
        try:
            republished = await replay_request(b.js, b.status, b.settings, request_id)
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
        if self.bridge.status is None or self.bridge.nc is None or not self.bridge.nc.is_connected:
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
                document = await self.bridge.status.update(
                    key, lambda d: stored.append(set_response(d, function_uid, value)))
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
