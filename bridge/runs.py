"""The bridge's run routes (§11): list runs, show one (and wait for it), cancel it, read Jobs' output.

Ids in routes may be a unique prefix of at least 8 characters (`gitfaas.runs.find_request`); an
ambiguous one is refused (`400`) naming the candidates.
"""

from __future__ import annotations

import json
from typing import Any

import nats.errors
from aiohttp import web

from bridge.publish import wait_timeout
from gitfaas.metrics import json_error
from gitfaas.publishing import wait_status
from gitfaas.runs import (
    DEFAULT_LIST_LIMIT,
    MAX_LIST_LIMIT,
    RUN_STATES,
    AmbiguousId,
    Found,
    RunIndex,
    UnknownId,
    cancel_run,
    control_logs,
    find_request,
    find_run,
    is_run_finished,
    job_documents,
    run_view,
)
from gitfaas.status import is_request_id
from gitfaas.timespec import parse_since

LOGS_TIMEOUT_SECONDS = 15.0
NOT_AN_ID = ("not a request id: request ids are 1 to 128 letters, digits, '-' or '_', starting with a letter "
             "or digit (a unique prefix of at least 8 characters works too)")


def run_filter(request: web.Request) -> dict[str, Any] | web.Response:
    """`?topic=&state=&since=&limit=` of `GET /runs` (and of the dashboard's live list), or the 400."""
    query = request.query
    state = query.get("state") or None
    if state is not None and state not in RUN_STATES:
        return json_error(400, f"state must be one of {', '.join(RUN_STATES)}")
    try:
        limit = int(query.get("limit", DEFAULT_LIST_LIMIT))
    except ValueError:
        return json_error(400, "limit must be a whole number")
    if not 1 <= limit <= MAX_LIST_LIMIT:
        return json_error(400, f"limit must be between 1 and {MAX_LIST_LIMIT}")
    try:
        since = parse_since(query["since"]) if query.get("since") else None
    except ValueError as exc:
        return json_error(400, str(exc))
    return {"topic": query.get("topic") or None, "state": state, "since": since, "limit": limit}


def id_error(exc: LookupError) -> web.Response:
    return json_error(400 if isinstance(exc, AmbiguousId) else 404, str(exc))


class RunRoutes:
    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge  # bridge.app.Bridge (not imported: it imports this module)
        self.index: RunIndex | None = None  # GET /runs answers from memory, kept up to date incrementally

    def add(self, app: web.Application) -> None:
        app.router.add_get("/runs", self.list_runs)
        app.router.add_get("/runs/{run_id}", self.get_run)
        app.router.add_post("/runs/{run_id}/cancel", self.cancel)
        app.router.add_get("/requests/{request_id}/logs", self.logs)

    def _unavailable(self) -> web.Response | None:
        b = self.bridge
        if b.status is None or b.runs is None or b.nc is None or not b.nc.is_connected:
            return json_error(503, "NATS is unavailable")
        return None

    async def find(self, given: str) -> Found | web.Response:
        """The request an id (or prefix) names, or the error answer."""
        if not is_request_id(given):
            return json_error(400, NOT_AN_ID)
        if (down := self._unavailable()) is not None:
            return down
        assert self.bridge.status is not None
        try:
            return await find_request(self.bridge.status, self.bridge.runs, given)
        except (UnknownId, AmbiguousId) as exc:
            return id_error(exc)

    async def _run(self, given: str) -> dict[str, Any] | web.Response:
        if not is_request_id(given):
            return json_error(400, NOT_AN_ID)
        if (down := self._unavailable()) is not None:
            return down
        assert self.bridge.status is not None and self.bridge.runs is not None
        try:
            return await find_run(self.bridge.status, self.bridge.runs, given)
        except (UnknownId, AmbiguousId) as exc:
            return id_error(exc)

    async def list_runs(self, request: web.Request) -> web.Response:
        if (down := self._unavailable()) is not None:
            return down
        wanted = run_filter(request)
        if isinstance(wanted, web.Response):
            return wanted
        return web.json_response({"runs": await self.listing().list(**wanted)})

    def listing(self) -> RunIndex:
        """The in-memory run index (`GET /runs`, and the dashboard's live list, `bridge/watch.py`)."""
        assert self.bridge.runs is not None
        if self.index is None or self.index.store is not self.bridge.runs:  # (a new connection: a new store)
            self.index = RunIndex(self.bridge.runs)
        return self.index

    async def get_run(self, request: web.Request) -> web.Response:
        run = await self._run(request.match_info["run_id"])
        if isinstance(run, web.Response):
            return run
        assert self.bridge.status is not None and self.bridge.runs is not None
        if request.query.get("wait") not in (None, "", "0", "false"):
            timeout = wait_timeout(request)
            if isinstance(timeout, web.Response):
                return timeout
            reached = is_run_finished(run)
            if not reached:
                reached, seen = await self.bridge.runs.wait(run["run_id"], is_run_finished, timeout)
                run = seen or run
            view = await run_view(self.bridge.status, run)
            return web.json_response(view, status=wait_status(reached, view))
        return web.json_response(await run_view(self.bridge.status, run))

    async def cancel(self, request: web.Request) -> web.Response:
        run = await self._run(request.match_info["run_id"])
        if isinstance(run, web.Response):
            return run
        b = self.bridge
        assert b.status is not None and b.runs is not None and b.nc is not None
        outcome = await cancel_run(b.status, b.runs, b.nc, b.settings.subject_prefix, run)
        view = await run_view(b.status, outcome.run)
        if outcome.status == 409:
            return web.json_response({**view, "error": outcome.error}, status=409)
        view.update(jobs_deleted=outcome.deleted, warning=outcome.error)
        return web.json_response(view, status=202)

    async def logs(self, request: web.Request) -> web.StreamResponse:
        """`text/plain`: each line of the request's Jobs' output, prefixed by the Job's name."""
        found = await self.find(request.match_info["request_id"])
        if isinstance(found, web.Response):
            return found
        b = self.bridge
        assert b.status is not None and b.runs is not None and b.nc is not None
        documents = [found.document]
        if request.query.get("run") not in (None, "", "0", "false"):
            try:
                run = await find_run(b.status, b.runs, found.request_id)
            except (UnknownId, AmbiguousId) as exc:
                return id_error(exc)
            documents = [d for d in (await run_view(b.status, run))["requests"] if d.get("documents")]
        jobs = job_documents(documents)
        text, error = await read_logs(b.nc, b.settings.subject_prefix, jobs)
        if error is not None:
            return json_error(503, error)
        return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def read_logs(nc: Any, subject_prefix: str, jobs: list[dict[str, Any]], after: dict[str, int] | None = None,
                    timeout: float = LOGS_TIMEOUT_SECONDS) -> tuple[str, str | None]:
    """Ask a consumer for these Jobs' output: (text, None), or ("", the reason there is none)."""
    if not jobs:
        return "", None
    request = {"jobs": [{"namespace": j.get("namespace"), "name": j["name"]} for j in jobs], "after": after or {}}
    try:
        reply = await nc.request(control_logs(subject_prefix), json.dumps(request).encode(), timeout=timeout)
    except nats.errors.NoRespondersError:
        return "", "no consumer is running to read the Jobs' output"
    except (TimeoutError, nats.errors.TimeoutError):
        return "", f"no consumer answered within {timeout:g}s"
    answer = json.loads(reply.data)
    lines = [line for job in answer.get("jobs") or [] for line in job.get("lines") or []]
    if answer.get("error") and not lines:
        return "", str(answer["error"])
    return "".join(line + "\n" for line in lines), None
