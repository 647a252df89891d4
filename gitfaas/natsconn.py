"""Connecting to NATS and declaring the JetStream objects both services rely on.

Whichever service starts first creates the stream, the dead-letter stream, the durable consumer
and the key-value buckets; the other finds them. Declarations are idempotent: an existing
object with the same configuration is left alone, one with a different configuration is updated.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
from nats.aio.client import Client
from nats.errors import NoServersError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from gitfaas import natsclient
from gitfaas.logs import get_logger
from gitfaas.settings import Settings
from gitfaas.subjects import CONFIG_BUCKET, REQUESTS_BUCKET, Subjects

log = get_logger(__name__)

# A consumer process applies at most MAX_CONCURRENCY messages at once and holds this many times as many: the
# others are being claimed or recorded (NATS round trips) or wait for their turn, so the status writes of
# some overlap the applies of others instead of taking their slots (issue 17: bench B2 +7 to 13%).
MESSAGES_HELD_PER_SLOT = 2
STREAM_NAME_IN_USE = 10058  # JetStream: "stream name already in use with a different configuration"
JS_ACK_PREFIX = "$JS.ACK."  # the reply subject of every message JetStream delivers from a stream


# A header name NATS clients accept to send (nats-py refuses any other); one parsed from the wire may not be.
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def wire_size(data: bytes, headers: Mapping[str, str] | None = None) -> int:
    """What nats-server counts against its `max_payload`: the body and the header block.

    (nats-py checks the body alone; a message whose headers take it over the limit makes the server
    close the connection.)"""
    if not headers:
        return len(data)
    size = len(data) + len(b"NATS/1.0\r\n\r\n")
    for name, value in headers.items():  # (a loop, not a generator: this runs on every publish)
        size += 4 + (len(name) if name.isascii() else len(name.encode())) + (
            len(value) if value.isascii() else len(value.encode(errors="replace")))
    return size


def is_stored_message(msg: Any) -> bool:
    """A message JetStream delivers from a stream, as opposed to a status from the server (idle
    heartbeat, pull request ended). Decided by the ack subject a stored message always carries, never
    by a `Status` header: a published message may carry a header of that name too."""
    reply = getattr(msg, "reply", "") or ""
    return reply.startswith(JS_ACK_PREFIX)


class NatsConfigError(RuntimeError):
    """NATS settings that cannot work (refused credentials, unreadable files): retrying will not help.

    The message names the setting, never its secret value.
    """


def server_urls(settings: Settings) -> list[str]:
    return [url.strip() for url in settings.nats_url.split(",") if url.strip()]


def display_servers(settings: Settings, separator: str = ", ") -> str:
    """The servers as they may be logged or told to functions: no user or password from NATS_URL."""
    shown = []
    for url in server_urls(settings):
        try:
            parts = urlsplit(url)
            netloc = parts.netloc.rsplit("@", 1)[-1]
            shown.append(urlunsplit((parts.scheme, netloc, parts.path, "", "")))
        except ValueError:
            shown.append("(invalid URL)")
    return separator.join(shown)


def connect_options(settings: Settings, name: str) -> dict[str, Any]:
    """Keyword arguments for `nats.connect`; credentials come only from settings.

    Raises `NatsConfigError` for a credentials or CA file that cannot be used, naming the setting.
    """
    options: dict[str, Any] = {
        "servers": server_urls(settings),
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 2,
        "ping_interval": 10,
        "max_outstanding_pings": 2,
    }
    if settings.nats_creds:
        if importlib.util.find_spec("nkeys") is None:
            raise NatsConfigError("NATS_CREDS needs the nkeys package (pip install 'nats-py[nkeys]')")
        if not os.access(settings.nats_creds, os.R_OK):
            raise NatsConfigError(f"NATS_CREDS: cannot read the credentials file {settings.nats_creds}")
        options["user_credentials"] = settings.nats_creds
    if settings.nats_token:
        options["token"] = settings.nats_token
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password or ""
    if settings.nats_tls_ca:
        try:
            options["tls"] = ssl.create_default_context(cafile=settings.nats_tls_ca)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise NatsConfigError(f"NATS_TLS_CA: cannot load {settings.nats_tls_ca}: {exc}") from None
    return options


async def _log_error(exc: Exception) -> None:
    """nats-py's own error callback logs a traceback per failed attempt; one line says enough."""
    log.warning("nats error", error=str(exc) or type(exc).__name__)


def _is_auth_failure(exc: BaseException) -> bool:
    if isinstance(exc, nats.errors.AuthorizationError):
        return True
    text = str(exc).lower()
    return isinstance(exc, nats.errors.Error) and ("authorization" in text or "authentication" in text)


async def connect(settings: Settings, name: str, *, attempts: int | None = None, **callbacks: Any) -> Client:
    """Connect, retrying the first connection too (NATS may start after us in a cluster).

    Refused credentials or a server certificate that fails verification end the retries at once
    with `NatsConfigError`: they are settings to fix, not a server still starting. Once connected,
    the client reconnects by itself, forever.
    """
    options = {"error_cb": _log_error, **connect_options(settings, name), **callbacks}
    # nats-py retries a first connection forever when reconnecting is allowed, and then a wrong
    # password is only ever a log line. So: one round over the servers per attempt, our own backoff
    # between attempts, and reconnecting switched on once connected.
    first = {**options, "allow_reconnect": False, "max_reconnect_attempts": 1}
    delay = 0.2
    tried = 0
    while True:
        tried += 1
        try:
            nc = await natsclient.connect(**first)
        except ssl.SSLCertVerificationError as exc:
            raise NatsConfigError(f"NATS server certificate not trusted ({display_servers(settings)}): "
                                  f"{exc.verify_message or exc}; check NATS_TLS_CA") from None
        except (TimeoutError, NoServersError, OSError, nats.errors.Error) as exc:
            if _is_auth_failure(exc):
                raise NatsConfigError(
                    f"NATS at {display_servers(settings)} refused the credentials "
                    f"({_credential_names(settings)}): {exc}") from None
            if attempts is not None and tried >= attempts:
                raise
            log.warning("nats not reachable yet, retrying", error=str(exc) or type(exc).__name__, in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        nc.options["allow_reconnect"] = options.get("allow_reconnect", True)
        nc.options["max_reconnect_attempts"] = options.get("max_reconnect_attempts", -1)
        return nc


def _credential_names(settings: Settings) -> str:
    """Which settings supplied credentials: names only, never values."""
    names = [name for name, value in (("NATS_CREDS", settings.nats_creds), ("NATS_TOKEN", settings.nats_token),
                                      ("NATS_USER/NATS_PASSWORD", settings.nats_user)) if value]
    return ", ".join(names) or "none given"


def _file_stream(name: str, subject: str, settings: Settings, **extra: Any) -> StreamConfig:
    return StreamConfig(name=name, subjects=[subject], storage=StorageType.FILE, retention=RetentionPolicy.LIMITS,
                        discard=DiscardPolicy.OLD, max_age=settings.stream_max_age_seconds,
                        num_replicas=settings.replicas, **extra)


def stream_config(settings: Settings) -> StreamConfig:
    # Direct gets: a run's unhandled children are looked for among the unacknowledged messages (§11).
    return _file_stream(settings.stream, Subjects(settings.subject_prefix).topics_wildcard, settings,
                        duplicate_window=settings.duplicate_window_seconds, allow_direct=True)


def dead_stream_config(settings: Settings) -> StreamConfig:
    return _file_stream(settings.dead_stream, Subjects(settings.subject_prefix).dead_wildcard, settings)


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
        await js.update_stream(config)
        log.info("stream configuration updated", stream=config.name)


def consumer_config(settings: Settings) -> ConsumerConfig:
    subjects = Subjects(settings.subject_prefix)
    return ConsumerConfig(
        durable_name=settings.durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_seconds,
        max_deliver=settings.max_deliver,
        filter_subject=subjects.topics_wildcard,
        # Bounded: no process can hoard more messages than the whole fleet is allowed in flight (room for
        # 8 consumer processes, each holding MESSAGES_HELD_PER_SLOT x MAX_CONCURRENCY).
        max_ack_pending=max(settings.max_concurrency * MESSAGES_HELD_PER_SLOT * 8, 256),
    )


async def ensure_consumer(js: JetStreamContext, settings: Settings) -> None:
    config = consumer_config(settings)
    try:
        await js.add_consumer(settings.stream, config)
    except BadRequestError as exc:
        # An existing durable with other limits: keep it working, say so.
        log.warning("durable consumer exists with another configuration", error=exc.description)


async def ensure_buckets(js: JetStreamContext, settings: Settings) -> tuple[KeyValue, KeyValue]:
    config_kv = await _ensure_bucket(js, KeyValueConfig(bucket=CONFIG_BUCKET, history=1,
                                                        replicas=settings.replicas))
    requests_kv = await _ensure_bucket(
        js, KeyValueConfig(bucket=REQUESTS_BUCKET, history=1, ttl=settings.request_ttl_seconds,
                           replicas=settings.replicas)
    )
    return config_kv, requests_kv


async def _ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    try:
        return await js.key_value(config.bucket)
    except (NotFoundError, BadRequestError):
        return await js.create_key_value(config)


async def ensure_all(js: JetStreamContext, settings: Settings) -> tuple[KeyValue, KeyValue]:
    """Everything both services need, declared in one place."""
    await ensure_stream(js, stream_config(settings))
    await ensure_stream(js, dead_stream_config(settings))
    await ensure_consumer(js, settings)
    return await ensure_buckets(js, settings)
