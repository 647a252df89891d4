"""Issue 17: the NATS client both services connect with gathers a few loop turns' commands into one
socket write (`gitfaas/natsclient.py`), against a real nats-server — and loses, delays or reorders
nothing while doing so.

The writes are counted at nats-py's transport (a private attribute, like the flush queue the
client hooks into): if a nats-py upgrade moves either, these tests say so instead of the speed-up
silently going away.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from gitfaas import natsconn
from gitfaas.embedded import EmbeddedNats
from gitfaas.natsclient import LINGER_TURNS, GatheringClient
from gitfaas.settings import Settings
from tests.conftest import wait_for


def count_publish_writes(nc: Client) -> list[int]:
    """Per socket write of `nc` from now on, how many publishes it carried."""
    writes: list[int] = []
    transport: Any = nc._transport  # private: see the module docstring
    original: Callable[[list[bytes]], None] = transport.writelines

    def counting(chunks: list[bytes]) -> None:
        writes.append(sum(1 for chunk in chunks if chunk.startswith((b"PUB ", b"HPUB "))))
        original(chunks)

    transport.writelines = counting
    return writes


async def publish_in_successive_turns(nc: Client, count: int) -> None:
    """`count` tasks, the i-th publishing in the i-th turn of the event loop (as the messages in
    flight of a busy consumer do: each reaches its next write a turn or so after the other)."""
    async def one(turn: int) -> None:
        for _ in range(turn):
            await asyncio.sleep(0)
        await nc.publish(f"gather.{turn}", str(turn).encode())

    await asyncio.gather(*(one(turn) for turn in range(count)))


async def test_services_connect_with_the_gathering_client(nats_server: EmbeddedNats) -> None:
    nc = await natsconn.connect(Settings(nats_url=nats_server.url), "test-gathering")
    try:
        assert isinstance(nc, GatheringClient)
    finally:
        await nc.close()


async def test_publishes_of_successive_turns_leave_in_one_write(nats_server: EmbeddedNats) -> None:
    """What the client is for: the plain nats-py client sends them in several writes (the control,
    so the count is known to tell the two apart); ours in one, and every message arrives, in order."""
    count = LINGER_TURNS + 1
    plain = await nats.connect(nats_server.url)
    gathering = await natsconn.connect(Settings(nats_url=nats_server.url), "test-gathering")
    # (A gathering reader: nats-py's own `flush()` may return before its subscription reached the server.)
    reader = await natsconn.connect(Settings(nats_url=nats_server.url), "test-reader")
    received: list[str] = []

    async def on_message(msg: Msg) -> None:
        received.append(msg.data.decode())

    try:
        await reader.subscribe("gather.>", cb=on_message)
        await reader.flush()

        plain_writes = count_publish_writes(plain)
        await publish_in_successive_turns(plain, count)
        await plain.flush()
        assert sum(plain_writes) == count and len([w for w in plain_writes if w]) > 1, plain_writes

        writes = count_publish_writes(gathering)
        await publish_in_successive_turns(gathering, count)
        await gathering.flush()
        assert [w for w in writes if w] == [count]

        await wait_for(lambda: len(received) == 2 * count, timeout=5)
        expected = [str(turn) for turn in range(count)]
        assert received[count:] == expected
    finally:
        for nc in (plain, gathering, reader):
            await nc.close()


async def test_a_lone_request_is_answered_and_a_publish_before_close_is_sent(nats_server: EmbeddedNats,
                                                                           tmp_path: Path) -> None:
    """An idle connection still answers at once (a request waits on nothing but its own write), and
    closing while the flusher lingers loses nothing: the close writes what is queued."""
    server = await natsconn.connect(Settings(nats_url=nats_server.url), "test-responder")
    client = await natsconn.connect(Settings(nats_url=nats_server.url), "test-requester")
    reader = await nats.connect(nats_server.url)
    last: list[bytes] = []

    async def echo(msg: Msg) -> None:
        await msg.respond(b"re: " + msg.data)

    async def on_last(msg: Msg) -> None:
        last.append(msg.data)

    try:
        await server.subscribe("echo", cb=echo)
        await reader.subscribe("last", cb=on_last)
        await server.flush()
        await reader.flush()
        for number in range(20):
            reply = await client.request("echo", str(number).encode(), timeout=2)
            assert reply.data == f"re: {number}".encode()
        await client.publish("last", b"sent just before close")
        await asyncio.sleep(0)  # the flusher has woken and lingers: the close comes in the middle of it
        assert client._flush_queue.qsize() == 0 and client.pending_data_size > 0
    finally:
        await client.close()
        await server.close()
    try:
        await wait_for(lambda: last == [b"sent just before close"], timeout=5)
    finally:
        await reader.close()


async def test_a_publish_waiting_for_a_forced_flush_is_released_when_the_connection_closes(
        nats_server: EmbeddedNats) -> None:
    """A publish that finds nats-py's buffer full waits for the flusher; closing the connection while
    the flusher lingers must not leave it waiting for ever."""
    for turns in range(LINGER_TURNS + 2):
        client = GatheringClient()
        await client.connect(servers=[nats_server.url], pending_size=100)  # a 1 KB publish forces a flush
        await client.publish("warm", b"x")
        await client.flush()
        publishing = asyncio.create_task(client.publish("forced", b"a" * 1000))
        for _ in range(turns):
            await asyncio.sleep(0)
        await client.close()
        done, _ = await asyncio.wait([publishing], timeout=5)
        assert done, f"the publish still waits after the close ({turns} turns in)"


def record_wire_order(nc: Client) -> list[bytes]:
    """Every command `nc` puts on the socket from now on, in order, whichever way nats-py writes it."""
    sent: list[bytes] = []
    transport: Any = nc._transport  # private: see the module docstring
    write, writelines = transport.write, transport.writelines

    def one(payload: bytes) -> None:
        sent.append(bytes(payload))
        write(payload)

    def many(chunks: list[bytes]) -> None:
        sent.extend(bytes(chunk) for chunk in chunks)
        writelines(chunks)

    transport.write, transport.writelines = one, many
    return sent


async def test_flush_confirms_the_subscription_made_before_it(nats_server: EmbeddedNats) -> None:
    """`subscribe(); flush()`: the PING goes out behind the SUB, so when `flush()` returns the server has the
    subscription and a message published next from anywhere is delivered. nats-py writes its PING ahead of
    what is still queued (the control shows it), which lingering would have made a real gap."""
    plain = await nats.connect(nats_server.url)
    gathering = await natsconn.connect(Settings(nats_url=nats_server.url), "test-gathering")
    publisher = await nats.connect(nats_server.url)
    received: list[bytes] = []

    async def on_message(msg: Msg) -> None:
        received.append(msg.data)

    try:
        plain_order = record_wire_order(plain)
        await plain.subscribe("order.plain", cb=on_message)
        await plain.flush()
        assert [c[:4] for c in plain_order if c[:4] in (b"SUB ", b"PING")] == [b"PING", b"SUB "], plain_order

        order = record_wire_order(gathering)
        for round_ in range(20):
            await gathering.subscribe(f"order.{round_}", cb=on_message)
            await gathering.flush()
            await publisher.publish(f"order.{round_}", str(round_).encode())
        kinds = [c[:4] for c in order if c[:4] in (b"SUB ", b"PING")]
        assert kinds == [b"SUB ", b"PING"] * 20
        await publisher.flush()
        await wait_for(lambda: len(received) == 20, timeout=5, message="every message published after a flush")
        assert received == [str(round_).encode() for round_ in range(20)]
    finally:
        for nc in (plain, gathering, publisher):
            await nc.close()
