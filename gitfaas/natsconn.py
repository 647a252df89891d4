"""Connecting to NATS and declaring the JetStream objects both services rely on.

Whichever service starts first creates the stream, the dead-letter stream, the durable consumer
and the key-value buckets; the other finds them. Declarations are idempotent: an existing
object with the same configuration is left alone, one with a different configuration is updated.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import nats
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

from gitfaas.logs import get_logger
from gitfaas.settings import Settings
from gitfaas.subjects import CONFIG_BUCKET, REQUESTS_BUCKET, Subjects

log = get_logger(__name__)

STREAM_NAME_IN_USE = 10058  # JetStream: "stream name already in use with a different configuration"


def connect_options(settings: Settings, name: str) -> dict[str, Any]:
    """Keyword arguments for `nats.connect`; credentials come only from settings."""
    options: dict[str, Any] = {
        "servers": [url.strip() for url in settings.nats_url.split(",") if url.strip()],
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 2,
        "ping_interval": 10,
        "max_outstanding_pings": 2,
    }
    if settings.nats_creds:
        options["user_credentials"] = settings.nats_creds
    if settings.nats_token:
        options["token"] = settings.nats_token
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password or ""
    if settings.nats_tls_ca:
        options["tls"] = ssl.create_default_context(cafile=settings.nats_tls_ca)
    return options


async def connect(settings: Settings, name: str, *, attempts: int | None = None, **callbacks: Any) -> Client:
    """Connect, retrying the first connection too (NATS may start after us in a cluster)."""
    options = connect_options(settings, name) | callbacks
    delay = 0.2
    tried = 0
    while True:
        tried += 1
        try:
            return await nats.connect(**options)
        except (TimeoutError, NoServersError, OSError) as exc:
            if attempts is not None and tried >= attempts:
                raise
            log.warning("nats not reachable yet, retrying", error=str(exc) or type(exc).__name__, in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _file_stream(name: str, subject: str, settings: Settings, **extra: Any) -> StreamConfig:
    return StreamConfig(name=name, subjects=[subject], storage=StorageType.FILE, retention=RetentionPolicy.LIMITS,
                        discard=DiscardPolicy.OLD, max_age=settings.stream_max_age_seconds, **extra)


def stream_config(settings: Settings) -> StreamConfig:
    return _file_stream(settings.stream, Subjects(settings.subject_prefix).topics_wildcard, settings,
                        duplicate_window=settings.duplicate_window_seconds)


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
        # Bounded: no process can hoard more messages than the whole fleet is allowed in flight.
        max_ack_pending=max(settings.max_concurrency * 8, 256),
    )


async def ensure_consumer(js: JetStreamContext, settings: Settings) -> None:
    config = consumer_config(settings)
    try:
        await js.add_consumer(settings.stream, config)
    except BadRequestError as exc:
        # An existing durable with other limits: keep it working, say so.
        log.warning("durable consumer exists with another configuration", error=exc.description)


async def ensure_buckets(js: JetStreamContext, settings: Settings) -> tuple[KeyValue, KeyValue]:
    config_kv = await _ensure_bucket(js, KeyValueConfig(bucket=CONFIG_BUCKET, history=1))
    requests_kv = await _ensure_bucket(
        js, KeyValueConfig(bucket=REQUESTS_BUCKET, history=1, ttl=settings.request_ttl_seconds)
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
