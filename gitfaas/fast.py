"""The `fast` extra (issue 17): uvloop for the event loop, orjson for hot-path JSON, each optional.

`pip install gitfaas[fast]` (what `make up`, the image and the test lock install) brings both; without
them everything falls back to asyncio's own loop and the standard `json` module, with the same results.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

try:  # pragma: no cover - depends on the platform's wheels
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

try:  # pragma: no cover
    import orjson
except ImportError:  # pragma: no cover
    orjson = None

LOOP = "uvloop" if uvloop is not None else "asyncio"
JSON = "orjson" if orjson is not None else "json"

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on a uvloop loop when uvloop is installed."""
    factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coroutine)


if orjson is not None:
    _dumps = orjson.dumps

    def dumps(value: Any, default: Callable[[Any], Any] | None = None) -> bytes:
        """Compact UTF-8 JSON bytes (orjson; non-str keys and subclasses as `json` would).

        `default`: what to write for an object JSON has no form for (as `json.dumps` takes it)."""
        try:
            return _dumps(value, default=default)
        except TypeError:  # e.g. int keys beyond orjson's defaults, integers over 64 bits
            return _std_dumps(value, default)

    loads_trusted = orjson.loads
else:  # pragma: no cover

    def dumps(value: Any, default: Callable[[Any], Any] | None = None) -> bytes:
        return _std_dumps(value, default)

    loads_trusted = json.loads


def _std_dumps(value: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    # A lone surrogate (text decoded with `surrogateescape`) has no UTF-8 form: written as U+FFFD, the
    # document stays valid UTF-8 JSON that every reader takes, instead of not being written at all.
    return _encode_text(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=default))


def _encode_text(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # (a valid surrogate pair written as two escapes stays one character)
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()
