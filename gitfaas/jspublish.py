"""JetStream publishes with their acks awaited, many in flight on one connection (issue 17).

nats-py's `JetStreamContext.publish` is a request per message: a fresh NUID plus `secrets.token_hex`
(a `getrandom` system call) for its reply token, an `asyncio.wait_for` per call for the timeout, and
a `PubAck` dataclass built through `dataclasses.fields`. Its `publish_async` keeps the token and the
dataclass and has no timeout at all. On the bridge's hot path that was about a third of a request's
CPU: measured on the 2-core bench machine, an aiohttp handler doing nothing but read the body,
publish and answer served ~9,300 requests/s with `js.publish`, ~11,200 with `publish_async` and
~14,600 with this module. So we chose our own here, built from nats-py's public pieces:

- one subscription on a private inbox wildcard receives every ack (as `publish_async` does);
- reply tokens are a counter: unique on this connection, no system call;
- every publish has the same timeout, so pending publishes sit in a dict in deadline order and one
  sweep a few times per second fails those past it with `nats.errors.TimeoutError`;
- the ack is decoded with orjson; an error ack raises nats-py's own `APIError` (and a no-responders
  status its `NoStreamResponseError`), so callers catch exactly what they caught from `js.publish`.

The consumer's key-value writes go the same way (`PipelinedKeyValue`). Ordinary publishes (the CLI,
replays, dead letters) keep using `js.publish`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import Header
from nats.js.kv import KeyValue

from gitfaas.fast import loads_trusted

EXPECTED_STREAM = Header.EXPECTED_STREAM.value
EXPECTED_LAST_SUBJECT_SEQUENCE = Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value
WRONG_LAST_SEQUENCE = 10071  # JetStream's err_code for a failed Nats-Expected-Last-Subject-Sequence
_STATUS = "Status"
_NO_RESPONDERS = "503"


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    duplicate: bool


def read_ack(data: bytes) -> Ack | Exception:
    """JetStream's answer to a publish: the ack, or the exception `js.publish` would raise.

    An error answer may carry a `seq` too (nats-server 2.15 sends `"seq": 0` with a refusal): the
    error is looked at first, so a refused message is never taken for a stored one.
    """
    try:
        answer = loads_trusted(data)  # from nats-server, small
    except ValueError:
        return nats.js.errors.APIError(description="unreadable JetStream ack")
    if not isinstance(answer, dict):
        return nats.js.errors.APIError(description="unexpected JetStream ack")
    error = answer.get("error")
    if error is not None:
        if not isinstance(error, dict) or "code" not in error:
            return nats.js.errors.APIError(description="unexpected JetStream error")
        try:
            nats.js.errors.APIError.from_error(error)  # nats-py raises the error rather than returning it
        except nats.js.errors.APIError as refused:
            return refused
        except TypeError:  # fields nats-py does not know
            return nats.js.errors.APIError(code=error.get("code"), description=str(error.get("description")))
    try:
        return Ack(int(answer["seq"]), bool(answer.get("duplicate", False)))
    except (KeyError, TypeError, ValueError):
        return nats.js.errors.APIError(description="unexpected JetStream ack")


class AckedPublisher:
    """Publish to a stream and wait for JetStream's ack, with one timeout for every publish."""

    def __init__(self, nc: Client, stream: str, timeout: float) -> None:
        self.nc = nc
        self.stream = stream
        self.timeout = timeout
        self._prefix = ""
        self._tokens = itertools.count()
        # token -> (future, deadline); insertion order is deadline order, since the timeout is one.
        self._pending: dict[str, tuple[asyncio.Future[Ack], float]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._subscription = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._prefix = self.nc.new_inbox() + "."
        self._subscription = await self.nc.subscribe(self._prefix + "*", cb=self._on_ack)
        self._sweeper = asyncio.create_task(self._sweep(), name="jetstream-ack-sweeper")

    async def close(self) -> None:
        """Stop sweeping and fail what is still waiting (its connection is going away)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._fail_all(nats.errors.ConnectionClosedError())
        if self._subscription is not None and not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await self._subscription.unsubscribe()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def publish(self, subject: str, body: bytes, headers: dict[str, str]) -> Ack:
        """Publish; return once JetStream stored the message (or say why it did not).

        Raises what `js.publish` raises: nats.errors.TimeoutError, ConnectionClosedError and the
        like from the connection, nats.js.errors.APIError / NoStreamResponseError from JetStream.
        """
        return await (await self.send(subject, body, headers))

    async def send(self, subject: str, body: bytes, headers: dict[str, str]) -> asyncio.Future[Ack]:
        """Publish; the future of JetStream's answer, as `publish` describes it. (The bridge awaits the
        future itself: one coroutine less to resume per publish.)"""
        if self._closed:
            raise nats.errors.ConnectionClosedError
        if self._loop is None:
            raise RuntimeError("AckedPublisher.start() was not called")
        token = str(next(self._tokens))
        future: asyncio.Future[Ack] = self._loop.create_future()
        self._pending[token] = (future, self._loop.time() + self.timeout)
        headers[EXPECTED_STREAM] = self.stream
        try:
            await self.nc.publish(subject, body, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._pending.pop(token, None)
            raise
        return future

    async def _on_ack(self, msg: Msg) -> None:
        entry = self._pending.pop(msg.subject[len(self._prefix):], None)
        if entry is None or entry[0].done():
            return  # timed out already, or its caller went away
        future = entry[0]
        if not msg.data and msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        outcome = read_ack(msg.data)
        if isinstance(outcome, Ack):
            future.set_result(outcome)
        else:
            future.set_exception(outcome)

    async def _sweep(self) -> None:
        interval = max(0.05, min(0.25, self.timeout / 10))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            expired = []
            for token, (_future, deadline) in self._pending.items():
                if deadline > now:
                    break
                expired.append(token)
            for token in expired:
                future, _deadline = self._pending.pop(token)
                if not future.done():
                    future.set_exception(nats.errors.TimeoutError())

    def _fail_all(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future, _deadline in pending.values():
            if not future.done():
                future.set_exception(error)


class PipelinedKeyValue:
    """A nats-py `KeyValue` whose writes (`create`, `update`, `put`) go through an `AckedPublisher`.

    The consumer writes a request's status and its run's index several times per message; through
    nats-py each write is a `js.publish` with the costs the module docstring lists. A key-value write
    is a publish to `$KV.<bucket>.<key>` (with `Nats-Expected-Last-Subject-Sequence` for `create` and
    `update`), so that is what this sends, raising what nats-py raises: `KeyWrongLastSequenceError`
    when another writer won. A `create` over a deleted key, and everything else (reads, watches,
    deletes), is nats-py's own.
    """

    def __init__(self, kv: KeyValue, bucket: str, publisher: AckedPublisher) -> None:
        self._kv = kv
        self._subject_prefix = f"$KV.{bucket}."
        self.publisher = publisher

    @classmethod
    async def of(cls, kv: KeyValue, bucket: str, nc: Client, timeout: float) -> PipelinedKeyValue:
        publisher = AckedPublisher(nc, f"KV_{bucket}", timeout)
        await publisher.start()
        return cls(kv, bucket, publisher)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)

    async def _write(self, key: str, value: bytes, headers: dict[str, str]) -> int:
        try:
            return (await self.publisher.publish(self._subject_prefix + key, value, headers)).seq
        except nats.js.errors.APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise nats.js.errors.KeyWrongLastSequenceError(description=exc.description) from None
            raise

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        return await self._write(key, value, {EXPECTED_LAST_SUBJECT_SEQUENCE: str(last or 0)})

    async def put(self, key: str, value: bytes) -> int:
        return await self._write(key, value, {})

    async def create(self, key: str, value: bytes) -> int:
        try:
            return await self.update(key, value, last=0)
        except nats.js.errors.KeyWrongLastSequenceError:
            return await self._kv.create(key, value)  # maybe a deleted key (nats-py reads and updates it)

    async def close(self) -> None:
        await self.publisher.close()
