"""The headers of a request message: built the same way by the bridge and `gitfaas publish`, and
read back, validated, by the consumer (and everything else that reads stored messages).

Every header value gitfaas puts on the wire or takes from it passes through here, so what may
become a subject, a key or a header is checked in one place (`gitfaas.subjects` has the rules).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gitfaas.subjects import (
    HEADER_CONTENT_TYPE,
    HEADER_MSG_ID,
    HEADER_PARAM_ENCODING,
    HEADER_PARAM_PREFIX,
    HEADER_PARENT,
    HEADER_PUBLISHED_AT,
    HEADER_REQUEST_ID,
    HEADER_RETRY,
    InvalidName,
    check_content_type,
    check_given_request_id,
    check_idempotency_key,
    check_param_name,
    check_request_id,
    encode_param,
)

_RETRY = re.compile(r"[0-9]{1,4}")
_MAX_TIMESTAMP_LENGTH = 32


def request_headers(
    request_id: str,
    params: Iterable[tuple[str, str]] = (),
    *,
    content_type: str | None = None,
    idempotency_key: str | None = None,
    parent: str | None = None,
) -> dict[str, str]:
    """Raises `InvalidName` for a parameter name, id, key or content type the contract does not allow."""
    headers = {HEADER_REQUEST_ID: check_request_id(request_id), HEADER_PUBLISHED_AT: f"{time.time():.6f}"}
    if content_type:
        headers[HEADER_CONTENT_TYPE] = check_content_type(content_type)
    encoded = False
    for name, value in params:
        check_param_name(name)
        try:
            headers[HEADER_PARAM_PREFIX + name] = encode_param(value)
        except UnicodeEncodeError:  # a lone surrogate (e.g. from undecodable command-line bytes)
            raise InvalidName(f"the value of parameter {name} is not valid text") from None
        encoded = True
    if encoded:
        headers[HEADER_PARAM_ENCODING] = "percent"
    if idempotency_key:
        headers[HEADER_MSG_ID] = check_idempotency_key(idempotency_key)
    if parent:
        headers[HEADER_PARENT] = check_request_id(parent, "parent")
    return headers


@dataclass(frozen=True, slots=True)
class Inbound:
    """What a stored message's headers say about its request, validated.

    `refusal` says why the message cannot be handled (naming the header, never quoting its value);
    the other fields are then what is safe to use for the refusal itself (`request_id` falls back
    to the id derived from the stream sequence).
    """

    request_id: str
    parent: str | None = None
    retry: int = 0
    published_at: float | None = None
    refusal: str | None = None


def derived_request_id(seq: int) -> str:
    """The id of a message published without one (§6): from its stream sequence."""
    return f"seq-{seq}"


def request_id_of(headers: Mapping[str, str] | None, seq: int) -> tuple[str, str | None]:
    """The request id a stored message has, and why its own header was refused (if it was)."""
    given = (headers or {}).get(HEADER_REQUEST_ID)
    if not given:  # absent or empty: not given
        return derived_request_id(seq), None
    try:
        return check_given_request_id(given, HEADER_REQUEST_ID), None
    except InvalidName as exc:
        return derived_request_id(seq), str(exc)


def read_request_headers(headers: Mapping[str, str] | None, seq: int) -> Inbound:
    headers = headers or {}
    request_id, refusal = request_id_of(headers, seq)
    parent = headers.get(HEADER_PARENT) or None
    if parent is not None:
        try:
            check_request_id(parent, HEADER_PARENT)
        except InvalidName as exc:
            parent, refusal = None, refusal or str(exc)
    retry_text = headers.get(HEADER_RETRY)
    retry = 0
    if retry_text is not None:
        if _RETRY.fullmatch(retry_text):
            retry = int(retry_text)
        else:
            refusal = refusal or f"{HEADER_RETRY} is not valid: 1 to 4 digits"
    return Inbound(request_id=request_id, parent=parent, retry=retry,
                   published_at=_timestamp(headers.get(HEADER_PUBLISHED_AT)), refusal=refusal)


def _timestamp(text: str | None) -> float | None:
    """`Gitfaas-Published-At` only feeds a metric: a value that is not a time is ignored."""
    if not text or len(text) > _MAX_TIMESTAMP_LENGTH:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
