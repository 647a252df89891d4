"""Reading stored messages back from JetStream and sending them through again (§5, §9).

Used by the bridge (`POST /requests/{id}/replay`) and the command line (`gitfaas replay`,
`gitfaas dead …`). A replay is always a *new* request linked to the original by
`Gitfaas-Parent`: new id, new object names, and the original stays as it was.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg
from nats.js.errors import NotFoundError

from gitfaas.jspublish import EXPECTED_STREAM
from gitfaas.message import derived_request_id, request_id_of
from gitfaas.natsconn import HEADER_NAME, wire_size
from gitfaas.settings import Settings
from gitfaas.status import StatusStore, is_request_id
from gitfaas.subjects import (
    HEADER_ATTEMPTS,
    HEADER_BODY_OMITTED,
    HEADER_CONTENT_TYPE,
    HEADER_ERROR,
    HEADER_PARAM_ENCODING,
    HEADER_PARAM_PREFIX,
    HEADER_PARENT,
    HEADER_PUBLISHED_AT,
    HEADER_REQUEST_ID,
    HEADER_STREAM_SEQ,
    Subjects,
    new_request_id,
)

# Headers a replay carries over: what the message said, not who sent it or when.
_KEPT_PREFIXES = (HEADER_PARAM_PREFIX.lower(),)
_KEPT = {HEADER_PARAM_ENCODING.lower(), HEADER_CONTENT_TYPE.lower()}


class ReplayError(LookupError):
    """The original cannot be found (expired, purged, unknown); the message says which."""


class ReplayTooLarge(ReplayError):
    """Sent again with a replay's headers, the original would be larger than NATS accepts."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    time: datetime | None

    @property
    def request_id(self) -> str:
        """As the consumer saw it: its own header if valid, else the id derived from its sequence."""
        return request_id_of(self.headers, self.seq)[0]


@dataclass(frozen=True, slots=True)
class Republished:
    request_id: str
    topic: str
    stream_seq: int
    parent: str

    def as_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "topic": self.topic, "stream_seq": self.stream_seq,
                "parent": self.parent}


@dataclass(slots=True)
class DeadLetter:
    seq: int
    topic: str
    request_id: str
    error: str
    attempts: str
    time: datetime | None
    headers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""

    def age_seconds(self) -> float | None:
        return None if self.time is None else max(0.0, time.time() - self.time.timestamp())


async def republish(js: JetStreamContext, settings: Settings, original: StoredMessage, topic: str,
                    extra: dict[str, str] | None = None, parent: str | None = None,
                    max_bytes: int | None = None) -> Republished:
    """`original` again as a new request; its parent is `parent`, else the original's request id.

    `max_bytes` (the server's `max_payload`): refuse with `ReplayTooLarge` what the server would close
    the connection for."""
    headers = {k: v for k, v in original.headers.items()
               if (k.lower() in _KEPT or k.lower().startswith(_KEPT_PREFIXES)) and HEADER_NAME.fullmatch(k)}
    headers.update(extra or {})
    new_id = new_request_id()
    parent = parent or original.request_id
    headers[HEADER_REQUEST_ID] = new_id
    headers[HEADER_PARENT] = parent
    headers[HEADER_PUBLISHED_AT] = f"{time.time():.6f}"
    if max_bytes and wire_size(original.data, {**headers, EXPECTED_STREAM: settings.stream}) > max_bytes:
        raise ReplayTooLarge(f"stream message {original.seq} with a replay's headers would be larger than NATS "
                             f"accepts ({max_bytes} bytes)")
    ack = await js.publish(Subjects(settings.subject_prefix).topic(topic), original.data, headers=headers,
                           stream=settings.stream)
    return Republished(request_id=new_id, topic=topic, stream_seq=ack.seq, parent=parent)


def headers_of(raw: RawStreamMsg) -> dict[str, str]:
    """A stored message's headers as text, parsed from the raw block as the consumer receives them.

    (nats-py's `get_msg` parses them as e-mail headers: a value that is not ASCII comes back as an
    `email.header.Header` object whose text is mangled.)
    """
    if not raw.hdrs:
        return {}
    block = base64.b64decode(raw.hdrs)
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n")[1:]:  # the first line is NATS/1.0 (and a status, if any)
        name, colon, value = line.partition(b":")
        key = name.strip().decode("ascii", errors="replace")
        if colon and key and not any(c.isspace() for c in key):
            headers[key] = value.strip().decode("utf-8", errors="replace")
    return headers


async def stored_message(js: JetStreamContext, stream: str, seq: int) -> StoredMessage:
    try:
        raw = await js.get_msg(stream, seq)
    except NotFoundError:
        raise ReplayError(f"message {seq} is no longer in stream {stream}") from None
    return StoredMessage(seq=seq, subject=raw.subject or "", data=raw.data or b"", headers=headers_of(raw),
                         time=raw.time)


async def replay_request(js: JetStreamContext, store: StatusStore, settings: Settings,
                         request_id: str, extra: dict[str, str] | None = None) -> Republished:
    status = await store.get(request_id)
    if status is None:
        raise ReplayError(f"request {request_id} is unknown or its status has expired")
    original = await stored_message(js, settings.stream, int(status["stream_seq"]))
    topic = Subjects(settings.subject_prefix).topic_of(original.subject) or status["topic"]
    return await republish(js, settings, original, topic, extra, max_bytes=store.max_bytes)


async def iterate(js: JetStreamContext, stream: str, subject: str, *, since: datetime | None = None
                  ) -> AsyncIterator[StoredMessage]:
    """Every message stored on `subject` (from `since`) up to the stream's last one when it starts.

    Read with the stream's message-get API, one at a time, not through a consumer: a delivered
    message carrying a header named `Status` would be taken for a server status by the client.
    """
    info = await js.stream_info(stream)
    last = info.state.last_seq
    seq = max(1, info.state.first_seq or 1) if since is None else await _first_at(js, stream, subject, since)
    while seq <= last:
        try:
            raw = await js.get_msg(stream, seq, subject=subject, next=True)
        except NotFoundError:
            return
        if raw.seq is None or raw.seq > last:
            return
        yield StoredMessage(seq=raw.seq, subject=raw.subject or "", data=raw.data or b"", headers=headers_of(raw),
                            time=raw.time)
        seq = raw.seq + 1


async def _first_at(js: JetStreamContext, stream: str, subject: str, since: datetime) -> int:
    """The first sequence stored at or after `since`, as the server finds it for a consumer starting there."""
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=since.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        filter_subject=subject,
        inactive_threshold=30.0,
        mem_storage=True,
    )
    info = await js.add_consumer(stream, config)
    try:
        return info.delivered.stream_seq + 1 if info.delivered and info.delivered.stream_seq else 1
    finally:
        try:
            await js.delete_consumer(stream, info.name)
        except NotFoundError:
            pass


async def replay_topic(js: JetStreamContext, store: StatusStore, settings: Settings, topic: str,
                       since: datetime, failed_only: bool = False) -> list[Republished]:
    subjects = Subjects(settings.subject_prefix)
    originals = [m async for m in iterate(js, settings.stream, subjects.topic(topic), since=since)]
    replayed: list[Republished] = []
    for original in originals:
        if failed_only:
            status = await store.get(original.request_id)
            if status is None or status.get("state") not in ("failed", "dead"):
                continue
        replayed.append(await republish(js, settings, original, topic))
    return replayed


# ---- dead letters ---------------------------------------------------------------------------

def _dead_letter(message: StoredMessage, subjects: Subjects) -> DeadLetter:
    topic = message.subject[len(subjects.dead_prefix):] if message.subject.startswith(subjects.dead_prefix) \
        else message.subject
    # The consumer wrote the id it used (its own, checked, or `seq-<n>`); an older letter may hold another.
    request_id = message.headers.get(HEADER_REQUEST_ID, "")
    if not is_request_id(request_id):
        request_id = derived_request_id(int(seq)) if (seq := message.headers.get(HEADER_STREAM_SEQ, "")).isdecimal() \
            and len(seq) < 20 else "unknown"
    return DeadLetter(seq=message.seq, topic=topic, request_id=request_id,
                      error=message.headers.get(HEADER_ERROR, ""),
                      attempts=message.headers.get(HEADER_ATTEMPTS, "?"), time=message.time,
                      headers=message.headers, data=message.data)


async def dead_letters(js: JetStreamContext, settings: Settings, limit: int | None = None) -> list[DeadLetter]:
    """The dead letters, oldest first (the first `limit` of them when given)."""
    subjects = Subjects(settings.subject_prefix)
    found: list[DeadLetter] = []
    async for message in iterate(js, settings.dead_stream, subjects.dead_wildcard):
        found.append(_dead_letter(message, subjects))
        if limit is not None and len(found) >= limit:
            break
    return found


async def dead_letter(js: JetStreamContext, settings: Settings, seq: int) -> DeadLetter:
    message = await stored_message(js, settings.dead_stream, seq)
    return _dead_letter(message, Subjects(settings.subject_prefix))


async def redrive(js: JetStreamContext, settings: Settings, seq: int) -> Republished:
    """Send a dead letter through the stream again as a linked request, then remove it."""
    letter = await dead_letter(js, settings, seq)
    original = StoredMessage(seq=seq, subject=Subjects(settings.subject_prefix).topic(letter.topic),
                             data=letter.data, headers=letter.headers, time=letter.time)
    if HEADER_BODY_OMITTED in letter.headers:  # too large to dead-letter whole: take it from the stream
        stream_seq = letter.headers.get(HEADER_STREAM_SEQ, "")
        if not stream_seq.isdecimal():
            raise ReplayError(f"dead letter {seq} has neither its body nor the sequence of its original")
        original = await stored_message(js, settings.stream, int(stream_seq))
    republished = await republish(js, settings, original, letter.topic, parent=letter.request_id)
    await js.delete_msg(settings.dead_stream, seq)
    return republished


async def purge_dead(js: JetStreamContext, settings: Settings) -> int:
    info = await js.stream_info(settings.dead_stream)
    count = info.state.messages
    await js.purge_stream(settings.dead_stream)
    return count
