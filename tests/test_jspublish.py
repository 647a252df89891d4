"""Issue 17: `gitfaas.jspublish.AckedPublisher`, the bridge's pipelined JetStream publishes, against a
real nats-server: what it returns and raises is what `js.publish` returns and raises.

A publish whose ack never comes is made without mocking: a plain core-NATS subscriber (no stream) takes
the message and never answers, so neither JetStream nor the server's no-responders status replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from gitfaas.embedded import EmbeddedNats
from gitfaas.jspublish import EXPECTED_STREAM, Ack, AckedPublisher, PipelinedKeyValue, read_ack
from tests.conftest import wait_for

STREAM = "JSP"
SUBJECT = "jsp.topic"
OTHER_STREAM = "OTHER"
OTHER_SUBJECT = "other.topic"
LOST_SUBJECT = "lost.topic"  # a core subscriber listens here, and never answers
GUARD = 5.0  # no test waits longer than this for one publish: a hang fails the test, it does not stall the run


@dataclass
class Jet:
    nc: Client
    js: JetStreamContext

    async def stored(self, stream: str = STREAM) -> int:
        return (await self.js.stream_info(stream)).state.messages


@pytest.fixture
async def jet(nats_server: EmbeddedNats) -> AsyncIterator[Jet]:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=["jsp.>"], duplicate_window=60))
        await js.add_stream(StreamConfig(name=OTHER_STREAM, subjects=["other.>"]))
        yield Jet(nc, js)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def publisher_of(jet: Jet, stream: str = STREAM, timeout: float = 5.0) -> AsyncIterator[AckedPublisher]:
    publisher = AckedPublisher(jet.nc, stream, timeout)
    await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.close()


@contextlib.asynccontextmanager
async def silent_subscriber(jet: Jet) -> AsyncIterator[list[Msg]]:
    """A core-NATS subscriber on LOST_SUBJECT that keeps what it receives and never replies."""
    received: list[Msg] = []

    async def keep(msg: Msg) -> None:
        received.append(msg)

    subscription = await jet.nc.subscribe(LOST_SUBJECT, cb=keep)
    await jet.nc.flush()  # the server knows the interest before anything is published
    try:
        yield received
    finally:
        await subscription.unsubscribe()


async def settled(task: asyncio.Future[Ack], limit: float = GUARD) -> Ack:
    """The publish's outcome; an AssertionError if it neither succeeded nor failed within `limit` seconds."""
    done, _ = await asyncio.wait({task}, timeout=limit)
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise AssertionError(f"the publish neither succeeded nor failed within {limit}s: it hangs")
    return task.result()


async def publish(publisher: AckedPublisher, subject: str, body: bytes = b"x",
                  headers: dict[str, str] | None = None, limit: float = GUARD) -> Ack:
    return await settled(asyncio.ensure_future(publisher.publish(subject, body, {} if headers is None else headers)),
                         limit)


# ---- acks -------------------------------------------------------------------------------------

async def test_five_hundred_concurrent_publishes_are_each_stored_once_with_their_own_ack(jet: Jet) -> None:
    count = 500
    async with publisher_of(jet) as publisher:
        headers = [{"X-Index": str(i)} for i in range(count)]
        acks = await asyncio.wait_for(asyncio.gather(*(
            publisher.publish(f"{SUBJECT}.{i % 7}", f"body-{i}".encode(), headers[i]) for i in range(count)
        )), GUARD * 2)
        assert publisher.pending == 0

    assert all(isinstance(ack, Ack) and not ack.duplicate for ack in acks)
    assert sorted(ack.seq for ack in acks) == list(range(1, count + 1)), "one distinct sequence per publish"
    assert await jet.stored() == count
    for i, ack in enumerate(acks):  # each ack names the message of its own publish
        stored = await jet.js.get_msg(STREAM, ack.seq)
        assert stored.data == f"body-{i}".encode()
        assert stored.subject == f"{SUBJECT}.{i % 7}"
        assert stored.headers is not None
        assert stored.headers["X-Index"] == str(i)
        assert stored.headers[EXPECTED_STREAM] == STREAM


async def test_a_repeated_message_id_is_a_duplicate_with_the_first_sequence(jet: Jet) -> None:
    async with publisher_of(jet) as publisher:
        await publish(publisher, SUBJECT, b"before")
        first = await publish(publisher, SUBJECT, b"one", {"Nats-Msg-Id": "key-1"})
        second = await publish(publisher, SUBJECT, b"two", {"Nats-Msg-Id": "key-1"})
        third = await publish(publisher, SUBJECT, b"three", {"Nats-Msg-Id": "key-2"})

    assert first == Ack(seq=2, duplicate=False)
    assert second == Ack(seq=2, duplicate=True)
    assert third == Ack(seq=3, duplicate=False)
    assert await jet.stored() == 3
    assert (await jet.js.get_msg(STREAM, 2)).data == b"one", "the duplicate was not stored"


# ---- refusals: what js.publish raises ------------------------------------------------------------

async def test_a_subject_of_another_stream_is_refused_with_an_api_error(jet: Jet) -> None:
    """The publisher names OTHER in Nats-Expected-Stream; JSP stores jsp.>: JetStream answers with an
    error ack (code 400, err_code 10060), nothing is stored, and the publisher keeps working."""
    with pytest.raises(nats.js.errors.BadRequestError) as js_refused:  # what nats-py's own publish raises
        await jet.js.publish(SUBJECT, b"x", headers={EXPECTED_STREAM: OTHER_STREAM})
    assert js_refused.value.err_code == 10060

    async with publisher_of(jet, stream=OTHER_STREAM) as publisher:
        with pytest.raises(nats.js.errors.APIError) as refused:
            await publish(publisher, SUBJECT, b"misplaced")
        assert isinstance(refused.value, nats.js.errors.Error)
        assert refused.value.code == 400 and refused.value.err_code == 10060, str(refused.value)
        assert publisher.pending == 0

        assert await publish(publisher, OTHER_SUBJECT, b"fine") == Ack(seq=1, duplicate=False)
        with pytest.raises(nats.js.errors.APIError):
            await publish(publisher, SUBJECT, b"misplaced again")
        assert await publish(publisher, OTHER_SUBJECT, b"fine again") == Ack(seq=2, duplicate=False)
        assert publisher.pending == 0

    assert await jet.stored(STREAM) == 0, "nothing reached the stream the subject belongs to"
    assert await jet.stored(OTHER_STREAM) == 2


async def test_a_subject_no_stream_stores_is_refused_at_once_with_no_stream_response(jet: Jet) -> None:
    """Nobody listens: the server's no-responders status, what js.publish raises too, not a timeout."""
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await jet.js.publish("nowhere.topic", b"x")

    async with publisher_of(jet, timeout=3.0) as publisher:
        started = time.monotonic()
        with pytest.raises(nats.js.errors.NoStreamResponseError) as refused:
            await publish(publisher, "nowhere.topic", b"lost")
        assert time.monotonic() - started < 1.0, "answered by the server, not by the timeout"
        assert isinstance(refused.value, nats.js.errors.Error) and isinstance(refused.value, nats.errors.Error)
        assert publisher.pending == 0
        assert await publish(publisher, SUBJECT, b"fine") == Ack(seq=1, duplicate=False)
    assert await jet.stored() == 1


async def test_acks_that_are_not_acks_are_api_errors(jet: Jet) -> None:
    """A responder on the subject answers with something that is not a JetStream ack: unreadable, not an
    object, or an error without a sequence. Each publish fails with an APIError (never hangs, never succeeds)."""
    answers = {b"unreadable": b"not json", b"list": b"[1, 2]",
               b"error": b'{"error":{"code":503,"err_code":10039,"description":"jetstream not enabled"}}'}

    async def answer(msg: Msg) -> None:
        await msg.respond(answers[msg.data])

    subscription = await jet.nc.subscribe(LOST_SUBJECT, cb=answer)
    await jet.nc.flush()
    try:
        async with publisher_of(jet, timeout=0.5) as publisher:
            for kind in (b"unreadable", b"list", b"error"):
                with pytest.raises(nats.js.errors.APIError) as refused:
                    await publish(publisher, LOST_SUBJECT, kind, limit=1.5)
                assert publisher.pending == 0, kind
            assert refused.value.code == 503 and refused.value.err_code == 10039, str(refused.value)
            assert isinstance(refused.value, nats.js.errors.ServiceUnavailableError), "as from_error maps it"
    finally:
        await subscription.unsubscribe()


# ---- acks that never come ---------------------------------------------------------------------

async def test_a_publish_whose_ack_never_comes_times_out_while_others_are_acked(jet: Jet) -> None:
    timeout = 0.5
    async with publisher_of(jet, timeout=timeout) as publisher, silent_subscriber(jet) as received:
        started = time.monotonic()
        lost = asyncio.create_task(publisher.publish(LOST_SUBJECT, b"into the void", {}))
        acks = await asyncio.gather(*(publish(publisher, SUBJECT, f"{i}".encode()) for i in range(50)))
        assert sorted(ack.seq for ack in acks) == list(range(1, 51))

        with pytest.raises(nats.errors.TimeoutError):
            await settled(lost)
        elapsed = time.monotonic() - started
        assert timeout - 0.05 <= elapsed <= timeout + 0.5, f"timed out after {elapsed:.3f}s"
        # The fault was the one intended: the message reached the silent subscriber, asking for a reply.
        assert [msg.data for msg in received] == [b"into the void"]
        assert received[0].reply
        assert publisher.pending == 0

        # An ack arriving after the timeout changes nothing; the publisher goes on working.
        await jet.nc.publish(received[0].reply, b'{"stream":"JSP","seq":999}')
        await jet.nc.flush()
        assert await publish(publisher, SUBJECT, b"after") == Ack(seq=51, duplicate=False)
        assert publisher.pending == 0
    assert await jet.stored() == 51


async def test_close_fails_the_publishes_in_flight_with_connection_closed(jet: Jet) -> None:
    async with silent_subscriber(jet) as received:
        publisher = AckedPublisher(jet.nc, STREAM, 30.0)
        await publisher.start()
        try:
            waiting = [asyncio.create_task(publisher.publish(LOST_SUBJECT, f"{i}".encode(), {}))
                       for i in range(3)]
            await wait_for(lambda: len(received) == 3, timeout=GUARD, message="the silent subscriber's messages")
            assert publisher.pending == 3
            assert not any(task.done() for task in waiting)
            started = time.monotonic()
        finally:
            await publisher.close()
        for task in waiting:
            with pytest.raises(nats.errors.ConnectionClosedError):
                await settled(task)
        assert time.monotonic() - started < 1.0, "failed by close(), not by a timeout"
        assert publisher.pending == 0


@pytest.mark.parametrize(("data", "expected"), [
    (b'{"stream":"S","seq":7}', Ack(7, False)),
    (b'{"stream":"S","seq":7,"duplicate":true}', Ack(7, True)),
    # A refusal carries "seq": 0 too: the error decides.
    (b'{"error":{"code":400,"err_code":10060,"description":"expected stream does not match"},"stream":"S","seq":0}',
     "expected stream does not match"),
    (b'{"error":{"code":503,"description":"no leader"}}', "no leader"),
    (b'{"error":{"code":400,"description":"x","unknown_field":1}}', "x"),
    (b'{"error":"a string"}', "unexpected JetStream error"),
    (b'{"error":{"description":"no code"}}', "unexpected JetStream error"),
    (b'{"stream":"S"}', "unexpected JetStream ack"),
    (b'{"seq":"seven"}', "unexpected JetStream ack"),
    (b"[1,2]", "unexpected JetStream ack"),
    (b"not json", "unreadable JetStream ack"),
])
def test_every_answer_to_a_publish_is_an_ack_or_the_error_js_publish_would_raise(data: bytes, expected: object) -> None:
    outcome = read_ack(data)
    if isinstance(expected, Ack):
        assert outcome == expected
    else:
        assert isinstance(outcome, nats.js.errors.APIError), outcome
        assert expected in str(outcome.description)


# ---- PipelinedKeyValue: the consumer's key-value writes ----------------------------------------------

async def test_pipelined_key_value_writes_keep_nats_py_semantics(jet: Jet) -> None:
    """create / update / put through the pipelined publisher: the same revisions, the same
    KeyWrongLastSequenceError when another writer won, and a create over a deleted key works."""
    kv = await jet.js.create_key_value(bucket="jsp_kv", history=1)
    fast = await PipelinedKeyValue.of(kv, "jsp_kv", jet.nc, timeout=GUARD)
    try:
        first = await asyncio.wait_for(fast.create("a", b"one"), GUARD)
        assert (await kv.get("a")).value == b"one" and (await kv.get("a")).revision == first
        with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
            await asyncio.wait_for(fast.create("a", b"again"), GUARD)  # exists: nats-py's own create says so
        second = await asyncio.wait_for(fast.update("a", b"two", last=first), GUARD)
        assert second > first and (await kv.get("a")).value == b"two"
        with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
            await asyncio.wait_for(fast.update("a", b"stale", last=first), GUARD)  # another writer won
        assert (await kv.get("a")).value == b"two"
        third = await asyncio.wait_for(fast.put("a", b"three"), GUARD)
        assert third > second and (await kv.get("a")).value == b"three"
        await kv.delete("a")
        again = await asyncio.wait_for(fast.create("a", b"reborn"), GUARD)  # over the delete marker
        assert (await kv.get("a")).value == b"reborn" and (await kv.get("a")).revision == again
        assert (await fast.get("a")).value == b"reborn"  # reads are nats-py's own
        assert fast.publisher.pending == 0
    finally:
        await fast.close()
