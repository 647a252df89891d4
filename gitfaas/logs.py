"""Structured logging: readable on a terminal, JSON lines elsewhere (or when asked).

Log lines carry `request_id`, `topic` and `stream_seq` through `structlog.contextvars`, so a
handler binds them once and every line below it is traceable.
"""

from __future__ import annotations

import json
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
    factory: Any = structlog.PrintLoggerFactory(file=sys.stderr)
    if use_json:
        renderer = structlog.processors.JSONRenderer()
        binary = getattr(sys.stderr, "buffer", None)
        if fast.orjson is not None and binary is not None:
            # structlog's own advice for speed (a line per message on the consumer's hot path, bench B2):
            # orjson writing bytes, straight to the stream's buffer.
            renderer = structlog.processors.JSONRenderer(serializer=_json_line)
            factory = structlog.BytesLoggerFactory(file=binary)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if use_json else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    # Libraries (nats, aiohttp, kubernetes_asyncio) log through the standard library.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(name)s: %(message)s")
    _configured = True


def _json_line(event: Any, **options: Any) -> bytes:
    """A log line by orjson (what it cannot write, e.g. an integer over 64 bits, by `json`)."""
    try:
        return fast.orjson.dumps(event, default=options.get("default"))  # type: ignore[no-any-return,union-attr]
    except TypeError:
        return json.dumps(event, **options).encode()


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
