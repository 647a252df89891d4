"""The dashboard (§11 `GET /`): plain HTML, CSS and JavaScript files shipped in `bridge/static/`.

`GET /` (and `/ui/`) answers `index.html`; `GET /ui/<file>` the other files. No build step, no
library, nothing fetched from elsewhere: the page works with no internet. The files hold no data, so
they are served without the token; everything the page shows comes from the authenticated JSON and
event routes, read with `fetch` and an `Authorization: Bearer` header when `BRIDGE_TOKEN` is set.

Every answer here carries a Content-Security-Policy that allows scripts and styles from this origin
only: no inline script, no inline event handler, no `eval`, no other site, no framing.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gitfaas.metrics import json_error

STATIC = Path(__file__).resolve().parent / "static"
ASSET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}\.(?:html|js|css|svg|png|txt)")
# Served without the token (they hold no data): `bridge.app` opens these routes.
UI_ROUTES = frozenset({"/", "/ui", "/ui/", "/ui/{name}"})
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets(folder: Path = STATIC) -> dict[str, Asset]:
    """Every file of the dashboard, read once (they are small: see `tests/test_dashboard.py`)."""
    assets = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        if path.is_file() and ASSET_NAME.fullmatch(path.name):
            body = path.read_bytes()
            content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if path.suffix == ".js":
                content_type = "text/javascript"
            assets[path.name] = Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    return assets


class Dashboard:
    def __init__(self) -> None:
        self.assets = load_assets()

    def add(self, app: web.Application) -> None:
        app.router.add_get("/", self.index)
        app.router.add_get("/ui", self.index)
        app.router.add_get("/ui/", self.index)
        app.router.add_get("/ui/{name}", self.asset)

    async def index(self, request: web.Request) -> web.Response:
        return self._answer(request, "index.html")

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not ASSET_NAME.fullmatch(name) or name == "index.html":
            return json_error(404, "no such file in the dashboard")
        return self._answer(request, name)

    def _answer(self, request: web.Request, name: str) -> web.Response:
        asset = self.assets.get(name)
        if asset is None:
            return json_error(404, "no such file in the dashboard" if name != "index.html"
                              else "the dashboard's files are missing from this installation")
        headers = {**SECURITY_HEADERS, "ETag": asset.etag, "Cache-Control": "no-cache"}
        if asset.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        charset = "utf-8" if asset.content_type.startswith(("text/", "image/svg")) else None
        return web.Response(body=asset.body, content_type=asset.content_type, charset=charset, headers=headers)
