"""The headers of a request message, built the same way by the bridge and `gitfaas publish`."""

from __future__ import annotations

import time
from collections.abc import Iterable

from gitfaas.subjects import (
    HEADER_CONTENT_TYPE,
    HEADER_MSG_ID,
    HEADER_PARAM_ENCODING,
    HEADER_PARAM_PREFIX,
    HEADER_PARENT,
    HEADER_PUBLISHED_AT,
    HEADER_REQUEST_ID,
    check_param_name,
    encode_param,
)


def request_headers(
    request_id: str,
    params: Iterable[tuple[str, str]] = (),
    *,
    content_type: str | None = None,
    idempotency_key: str | None = None,
    parent: str | None = None,
) -> dict[str, str]:
    """Raises `InvalidName` for a parameter name the contract does not allow."""
    headers = {HEADER_REQUEST_ID: request_id, HEADER_PUBLISHED_AT: f"{time.time():.6f}"}
    if content_type:
        headers[HEADER_CONTENT_TYPE] = content_type
    encoded = False
    for name, value in params:
        check_param_name(name)
        headers[HEADER_PARAM_PREFIX + name] = encode_param(value)
        encoded = True
    if encoded:
        headers[HEADER_PARAM_ENCODING] = "percent"
    if idempotency_key:
        headers[HEADER_MSG_ID] = idempotency_key
    if parent:
        headers[HEADER_PARENT] = parent
    return headers
