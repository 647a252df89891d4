"""Structured logging: readable on a terminal, JSON lines elsewhere (or when asked).

Log lines carry `request_id`, `topic` and `stream_seq` through `structlog.contextvars`, so a
handler binds them once and every line below it is traceable.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from gitfaas import fast

_configured = False


def configure(level: str = "INFO", fmt: str = "auto") -> None:
    """Idempotent: the `up` launcher and each service may call it."""
    global _configured
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    if use_json:
        # orjson, as structlog advises for speed (a line per message on the consumer's hot path, bench B2).
        # Written as text to `sys.stderr` itself, not its binary buffer: `gitfaas up` guards that stream
        # (cli/output.py: a closed pipe stops everything instead of failing every write).
        renderer = structlog.processors.JSONRenderer(serializer=_json_line)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if use_json else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (nats, aiohttp, kubernetes_asyncio) log through the standard library.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(name)s: %(message)s")
    _configured = True


def _json_line(event: Any, **options: Any) -> str:
    """A log line by `fast.dumps` (orjson when installed), with structlog's fallback for other objects."""
    return fast.dumps(event, default=options.get("default")).decode()


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
