"""Prometheus exposition shared by both services' `/metrics` routes."""

from __future__ import annotations

import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess, values

from gitfaas import fast

# Multiprocess mode (the bridge's workers) asks for the process id on every increment, to notice a
# fork: a system call each time, three per publish (~4% of a worker's CPU, bench B1). The id is kept
# here instead and renewed in a forked child; prometheus_client takes such a function for this
# (`MultiProcessValue(process_identifier=...)`). Set before any metric exists: the modules that
# define metrics import this one first.
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


def process_id() -> int:
    return _PID[0]


# prometheus_client's own variable (bridge/workers.py sets it for the workers), read once as the library does.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
if MULTIPROCESS:
    values.ValueClass = values.MultiProcessValue(process_identifier=process_id)


def _registry() -> CollectorRegistry:
    """One bridge of several (BRIDGE_WORKERS, bridge/workers.py): every worker's figures added up."""
    if not MULTIPROCESS:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


async def metrics_view(_request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest(_registry()))
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


def json_error(status: int, message: str) -> web.Response:
    """Every error the services answer has this shape: `{"error": "<clear sentence>"}`."""
    return json_answer({"error": message}, status)


def json_answer(value: object, status: int = 200) -> web.Response:
    """`web.json_response`, with the body written by orjson when installed (issue 17: the hot path's answer)."""
    return web.Response(body=fast.dumps(value), status=status, content_type="application/json")
