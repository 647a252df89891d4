"""Names on the wire: subjects, headers, buckets, and what a valid topic or parameter is.

Both services and every function speak this vocabulary, so it lives in one place.
"""

from __future__ import annotations

import os
import re
import threading
from urllib.parse import quote, unquote

# A topic is one or more NATS subject tokens; never a wildcard, a space or an empty token.
TOPIC_PATTERN = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
# Variable / parameter names as written in a manifest: `{{ body.file.name }}`, `{{ replicas }}`.
PARAM_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
MAX_TOPIC_LENGTH = 200
MAX_PARAM_NAME_LENGTH = 200
# A request id becomes a key of the status bucket (so part of a NATS subject), a header value, a label
# and part of FUNCTION_UID: letters, digits, '-' and '_', starting with a letter or digit. The bridge
# makes UUIDs; `seq-<n>` is reserved for the ids the consumer derives from the stream sequence.
MAX_REQUEST_ID_LENGTH = 128
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
DERIVED_ID_PATTERN = re.compile(r"seq-[0-9]+")
# An `Idempotency-Key` (the JetStream message id): visible ASCII, no spaces.
MAX_IDEMPOTENCY_KEY_LENGTH = 256
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[\x21-\x7e]+")
MAX_CONTENT_TYPE_LENGTH = 255

HEADER_REQUEST_ID = "Gitfaas-Request-Id"
HEADER_PARENT = "Gitfaas-Parent"
# Set on the automatic re-run of a request whose Job failed (a topic's `retries`): its number.
HEADER_RETRY = "Gitfaas-Retry"
HEADER_PARAM_PREFIX = "Gitfaas-Param-"
# Set by the bridge: parameter values are percent-encoded, because a NATS header value cannot
# hold a line break. A function publishing by hand may omit it and send raw values.
HEADER_PARAM_ENCODING = "Gitfaas-Params-Encoding"
HEADER_CONTENT_TYPE = "Gitfaas-Content-Type"
HEADER_PUBLISHED_AT = "Gitfaas-Published-At"
HEADER_ERROR = "Gitfaas-Error"
# Set on a dead letter: the original's stream sequence, its deliveries, and (when the original was too
# large to be copied whole) the size of the body left out, which a redrive then reads from the stream.
HEADER_STREAM_SEQ = "Gitfaas-Stream-Seq"
HEADER_ATTEMPTS = "Gitfaas-Attempts"
HEADER_BODY_OMITTED = "Gitfaas-Body-Omitted"
HEADER_MSG_ID = "Nats-Msg-Id"

CONFIG_BUCKET = "gitfaas_config"
CONFIG_KEY = "current"
REQUESTS_BUCKET = "gitfaas_requests"

# Names a parameter may not take: they are set by gitfaas itself (§4).
BUILTIN_VARIABLES = frozenset(
    {
        "MESSAGE",
        "PAYLOAD",
        "REQUEST_UUID",
        "REQUEST_ID",
        "FUNCTION_UID",
        "RANDOM",
        "TOPIC",
        "NATS_URL",
        "BRIDGE_URL",
    }
)


class InvalidName(ValueError):
    """A topic, parameter name, id or header value the contract does not allow; the message says why.

    The message never quotes the refused value: it may be anything, of any length.
    """


def check_topic(topic: str, *, quote: bool = False) -> str:
    """`quote`: name the refused topic in the message (for trusted text, such as the repository's)."""
    if not topic:
        raise InvalidName("topic name is empty")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise InvalidName(f"topic name is longer than {MAX_TOPIC_LENGTH} characters")
    if not TOPIC_PATTERN.fullmatch(topic):
        raise InvalidName(
            f"topic name {f'{topic!r} ' if quote else ''}is not valid: use letters, digits, '_' and '-', "
            "with '.' between tokens (no '*', '>', spaces or empty tokens)"
        )
    return topic


def check_param_name(name: str, *, quote: bool = False) -> str:
    if len(name) > MAX_PARAM_NAME_LENGTH or not PARAM_NAME_PATTERN.fullmatch(name):
        raise InvalidName(
            f"{f'parameter name {name[:MAX_PARAM_NAME_LENGTH]!r}' if quote else 'a parameter name'} is not "
            f"valid: start with a letter or '_', then letters, digits, '_', '.' or '-' "
            f"(at most {MAX_PARAM_NAME_LENGTH} characters)"
        )
    if name in BUILTIN_VARIABLES:
        raise InvalidName(f"parameter {name!r} would override the built-in variable of that name")
    if name.startswith("body."):
        raise InvalidName(f"parameter {name!r} would shadow a field of the JSON body")
    return name


def check_request_id(value: str, what: str = "request id") -> str:
    """A request (or parent) id as it may enter: see `REQUEST_ID_PATTERN`. `InvalidName` otherwise."""
    if not value or len(value) > MAX_REQUEST_ID_LENGTH or not REQUEST_ID_PATTERN.fullmatch(value):
        raise InvalidName(f"{what} is not valid: 1 to {MAX_REQUEST_ID_LENGTH} letters, digits, '-' or '_', "
                          "starting with a letter or digit")
    return value


_RANDOM_POOL_BYTES = 4096
_random_pool = b""
_random_at = 0
_random_lock = threading.Lock()


def _reset_random_pool() -> None:
    global _random_pool, _random_at, _random_lock
    _random_pool, _random_at, _random_lock = b"", 0, threading.Lock()


os.register_at_fork(after_in_child=_reset_random_pool)  # a forked child must not reuse its parent's bytes


_VARIANT_DIGIT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_request_id() -> str:
    """A new request id: a random UUID (version 4) in its usual text form.

    The same as `str(uuid.uuid4())` from the same source (`os.urandom`), but the bytes are drawn 4 KiB
    at a time: `uuid4` makes a `getrandom` system call per id, a few % of a publish on the bridge's
    hot path (issue 17), and builds a `UUID` object only to print it.
    """
    global _random_pool, _random_at
    with _random_lock:  # threads must not share bytes (uuid4 never repeats across threads either)
        if _random_at + 16 > len(_random_pool):
            _random_pool, _random_at = os.urandom(_RANDOM_POOL_BYTES), 0
        text = _random_pool[_random_at:_random_at + 16].hex()
        _random_at += 16
    # RFC 9562: version 4 as the 13th hex digit, the variant (binary 10xx) in the 17th.
    return f"{text[:8]}-{text[8:12]}-4{text[13:16]}-{_VARIANT_DIGIT[text[16]]}{text[17:20]}-{text[20:]}"


def check_given_request_id(value: str, what: str = "request id") -> str:
    """An id a message brings itself: valid, and not one of the `seq-<n>` ids gitfaas derives."""
    check_request_id(value, what)
    if DERIVED_ID_PATTERN.fullmatch(value):
        raise InvalidName(f"{what} is not valid: ids of the form seq-<n> are reserved for gitfaas")
    return value


def check_idempotency_key(value: str) -> str:
    if len(value) > MAX_IDEMPOTENCY_KEY_LENGTH or not IDEMPOTENCY_KEY_PATTERN.fullmatch(value):
        raise InvalidName(f"Idempotency-Key is not valid: 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII "
                          "characters, no spaces")
    return value


def check_content_type(value: str) -> str:
    """A content type as it is carried in a header: printable ASCII, bounded."""
    if len(value) > MAX_CONTENT_TYPE_LENGTH or not (value.isascii() and value.isprintable()):  # " " to "~"
        raise InvalidName(f"Content-Type is not valid: at most {MAX_CONTENT_TYPE_LENGTH} printable ASCII "
                          "characters")
    return value


class Subjects:
    """Subjects derived from the configurable prefix (`GITFAAS_SUBJECT_PREFIX`)."""

    def __init__(self, prefix: str = "gitfaas") -> None:
        self.prefix = prefix
        self.topics_prefix = f"{prefix}.topics."
        self.topics_wildcard = f"{prefix}.topics.>"
        self.dead_prefix = f"{prefix}.dead."
        self.dead_wildcard = f"{prefix}.dead.>"
        self.refresh = f"{prefix}.control.refresh"

    def topic(self, topic: str) -> str:
        return self.topics_prefix + topic

    def dead(self, topic: str) -> str:
        return self.dead_prefix + topic

    def topic_of(self, subject: str) -> str | None:
        if subject.startswith(self.topics_prefix):
            return subject[len(self.topics_prefix) :]
        return None


def encode_param(value: str) -> str:
    return quote(value, safe="")


def decode_params(headers: dict[str, str] | None) -> dict[str, str]:
    """Parameters a message carries, decoded as the bridge encoded them (or raw from a function)."""
    if not headers:
        return {}
    encoding_header = HEADER_PARAM_ENCODING.lower()
    encoded = any(k.lower() == encoding_header and v.lower() == "percent" for k, v in headers.items())
    cut = len(HEADER_PARAM_PREFIX)
    params: dict[str, str] = {}
    for key, value in headers.items():
        if len(key) > cut and key[:cut].lower() == HEADER_PARAM_PREFIX.lower():
            name = key[cut:]
            params[name] = unquote(value) if encoded else value
    return params
