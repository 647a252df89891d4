"""The bridge's dead-letter routes: what `gitfaas dead list|show|redrive|purge` does, over HTTP.

| route | does |
| --- | --- |
| `GET /dead-letters?limit=N` | `{"dead_letters": [...], "count": n}`, oldest first (at most `limit`, default 200) |
| `GET /dead-letters/{seq}` | one letter: its headers, error, and a preview of its body (text, at most 4 KiB) |
| `POST /dead-letters/{seq}/redrive` | sends it through again as a new request linked to the dead one; `202` |
| `POST /dead-letters/redrive` | the same for every dead letter; `202 {"redriven": [...], "errors": [...]}` |
| `POST /dead-letters/purge[?through=SEQ]` | removes them all (or those up to `SEQ`, the last one a person saw) |

The logic is `gitfaas.replay`'s, the same the command line uses. A browser request from another site
(`Origin` or `Sec-Fetch-Site` says so) is refused on the routes that change something: without
`BRIDGE_TOKEN` nothing else would stop a web page from posting to a bridge on localhost.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from gitfaas.metrics import json_error
from gitfaas.replay import DeadLetter, ReplayError, ReplayTooLarge, dead_letter, dead_letters, redrive
from gitfaas.runs import rfc3339

DEFAULT_LIMIT = 200
MAX_LIMIT = 1000
PREVIEW_BYTES = 4096


def summary(letter: DeadLetter) -> dict[str, Any]:
    return {"seq": letter.seq, "topic": letter.topic, "request_id": letter.request_id, "error": letter.error,
            "attempts": letter.attempts, "time": rfc3339(letter.time.timestamp()) if letter.time else None,
            "age_seconds": letter.age_seconds(), "body_bytes": len(letter.data)}


def details(letter: DeadLetter) -> dict[str, Any]:
    preview = letter.data[:PREVIEW_BYTES]
    return {**summary(letter), "headers": dict(sorted(letter.headers.items())),
            "body_preview": preview.decode("utf-8", errors="replace"),
            "body_truncated": len(letter.data) > len(preview)}


def cross_site(request: web.Request) -> bool:
    """A browser says this request comes from a page of another site."""
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return True
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return origin == "null"
    return urlsplit(origin).netloc.lower() != request.host.lower()


class DeadLetterRoutes:
    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge  # bridge.app.Bridge (not imported: it imports this module)

    def add(self, app: web.Application) -> None:
        app.router.add_get("/dead-letters", self.list_letters)
        app.router.add_post("/dead-letters/redrive", self.redrive_all)
        app.router.add_post("/dead-letters/purge", self.purge)
        app.router.add_get(r"/dead-letters/{seq:\d{1,19}}", self.show)
        app.router.add_post(r"/dead-letters/{seq:\d{1,19}}/redrive", self.redrive_one)

    def _unavailable(self) -> web.Response | None:
        b = self.bridge
        if b.js is None or b.nc is None or not b.nc.is_connected:
            return json_error(503, "NATS is unavailable")
        return None

    def _refused(self, request: web.Request) -> web.Response | None:
        if cross_site(request):
            return json_error(403, "refused: this request comes from a page of another site")
        return self._unavailable()

    async def _count(self) -> int:
        return int((await self.bridge.js.stream_info(self.bridge.settings.dead_stream)).state.messages or 0)

    async def list_letters(self, request: web.Request) -> web.Response:
        if (down := self._unavailable()) is not None:
            return down
        try:
            limit = int(request.query.get("limit", DEFAULT_LIMIT))
        except ValueError:
            return json_error(400, "limit must be a whole number")
        if not 1 <= limit <= MAX_LIMIT:
            return json_error(400, f"limit must be between 1 and {MAX_LIMIT}")
        letters = await dead_letters(self.bridge.js, self.bridge.settings, limit=limit)
        return web.json_response({"dead_letters": [summary(d) for d in letters], "count": await self._count()})

    async def show(self, request: web.Request) -> web.Response:
        if (down := self._unavailable()) is not None:
            return down
        seq = int(request.match_info["seq"])
        try:
            letter = await dead_letter(self.bridge.js, self.bridge.settings, seq)
        except ReplayError:
            return json_error(404, f"dead letter {seq} is unknown (redriven, purged or never there)")
        return web.json_response(details(letter))

    async def redrive_one(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        seq = int(request.match_info["seq"])
        try:
            republished = await redrive(self.bridge.js, self.bridge.settings, seq)
        except ReplayTooLarge as exc:
            return json_error(413, str(exc))
        except ReplayError as exc:
            return json_error(404, f"dead letter {seq}: {exc}")
        return web.json_response({"seq": seq, **republished.as_dict()}, status=202)

    async def redrive_all(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        b = self.bridge
        redriven, errors = [], []
        for seq in [d.seq for d in await dead_letters(b.js, b.settings)]:
            try:
                redriven.append({"seq": seq, **(await redrive(b.js, b.settings, seq)).as_dict()})
            except ReplayError as exc:
                errors.append({"seq": seq, "error": str(exc)})
        return web.json_response({"redriven": redriven, "errors": errors}, status=202)

    async def purge(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        through = request.query.get("through")
        if through is not None and not (through.isdecimal() and len(through) < 20):
            return json_error(400, "through must be the sequence number of a dead letter")
        b = self.bridge
        before = await self._count()
        # Up to the last letter the person saw: one that arrived since is kept.
        await b.js.purge_stream(b.settings.dead_stream, seq=int(through) + 1 if through else None)
        return web.json_response({"purged": max(0, before - await self._count())})

