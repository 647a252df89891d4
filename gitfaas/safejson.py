"""JSON from messages and requests, parsed with a nesting limit.

Python's `json` recurses once per level: tens of thousands of `[` raise `RecursionError` deep in
the parser (a crash, not a refusal). Here the depth is measured first, without recursion, and a
body nested deeper than `MAX_JSON_DEPTH` is refused with `JsonTooDeep` (a `ValueError`, like any
other invalid JSON) before `json.loads` sees it. Both the bridge and the consumer use it, so a
body one accepts the other accepts too.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gitfaas import fast

MAX_JSON_DEPTH = 100  # arrays and objects open at once; YAML manifests have the same limit

# Outside strings only brackets count; inside them an escape pair is skipped as one token.
_TOKENS = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)


class JsonTooDeep(ValueError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"JSON nested more than {limit} levels deep")
        self.limit = limit


def depth_exceeds(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `data` opens more than `limit` arrays or objects at once (strings are skipped)."""
    if data.count(b"[") + data.count(b"{") <= limit:  # the common case: cannot be that deep
        return False
    depth = 0
    in_string = False
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token == b'"':
            in_string = not in_string
        elif in_string or len(token) == 2:
            continue
        elif token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def loads(data: bytes | str, limit: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads`, refusing more than `limit` levels of nesting with `JsonTooDeep`.

    Raises `ValueError` (`json.JSONDecodeError`, `JsonTooDeep`) or `UnicodeDecodeError` for a body that
    is not JSON, as `json.loads` does.
    """
    raw = data.encode("utf-8", errors="surrogatepass") if isinstance(data, str) else bytes(data)
    encoding = json.detect_encoding(raw)
    if encoding not in ("utf-8", "utf-8-sig"):
        # UTF-16/32 (which json.loads accepts): scan its UTF-8 form, where a '"' byte is a quote.
        raw = raw.decode(encoding, errors="surrogatepass").encode("utf-8", errors="surrogatepass")
    if depth_exceeds(raw, limit):
        raise JsonTooDeep(limit)
    return json.loads(raw)


def validate(data: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise as `loads` would for a body that is not JSON (or too deep); the value is not needed.

    After the same depth check, orjson (when installed) says yes fast; anything it refuses is decided
    by `json.loads`, so the bodies accepted and the error messages are exactly those of `loads`.
    """
    if fast.orjson is not None and not depth_exceeds(data, limit):
        try:
            fast.orjson.loads(data)
        except ValueError:
            pass  # NaN, a UTF-16 body, a lone surrogate...: json decides
        else:
            return
    loads(data, limit)
