"""The NATS client both services connect with: nats-py's, with its socket writes gathered.

nats-py queues every command (a publish, an ack, a key-value write) and wakes its flusher task,
which writes what is queued in one `send`, at the next turn of the event loop. Under load the
commands of one message come a turn or two apart (a status write, then the ack), and so do those
of the messages in flight beside it, so most left in a write of their own, and each write woke
nats-server. On the 2-core bench machine (four busy processes) py-spy put ~15% of the consumer's
samples on those writes: little of it the system call itself (perf: 7% of the consumer's CPU in
the kernel, all calls together), most of it waiting to run again after waking the server.

Waiting `LINGER_TURNS` more turns of the loop before writing gathers them (issue 17: bench B2
+10 to 15%, B1 +7 to 17%). A turn with nothing else to do takes microseconds, so an idle service
answers as fast as before; a busy one writes less often, with more in each write.

nats-py has no setting for this. The hook is its flush queue, a private attribute (pinned
nats-py 2.16; `tests/test_natsclient.py` fails if it moves): the flusher's wait on it lingers. A PING
then goes through the same queue, in order (`_send_ping`), so `flush()` still means that everything
before it has reached the server.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import PING_PROTO
from nats.aio.client import Client as NatsClient

LINGER_TURNS = 2  # 1 gathered less (B1 +7%), 3 and 4 no more than 2 (bench B1, B2; 2026-11-29)


class _LingeringQueue(asyncio.Queue[Any]):
    """nats-py's flush queue, whose reader (the flusher) waits `LINGER_TURNS` turns after each wake-up."""

    async def get(self) -> Any:
        item = None
        try:
            item = await super().get()
            for _ in range(LINGER_TURNS):
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            # The connection is closing or reconnecting: its close writes what is pending, a reconnect
            # kicks the next flusher. Whoever waits on a wake-up (a publish that found the buffer full
            # and forced a flush) is released, or it would wait for ever — nats-py's own flusher leaves
            # the ones still queued so (found with its default `flush_timeout=None`).
            _release(item)
            while not self.empty():
                _release(self.get_nowait())
            raise
        return item


def _release(item: Any) -> None:
    if isinstance(item, asyncio.Future) and not item.done():
        item.set_result(None)


class GatheringClient(NatsClient):
    """nats-py's `Client`, writing a few loop turns' commands in one go (see the module's docstring)."""

    async def _flusher(self) -> None:
        queue = self._flush_queue
        if queue is not None and not isinstance(queue, _LingeringQueue):
            # Set up once per connection, before the first flusher reads it; what is queued moves over.
            lingering = _LingeringQueue(maxsize=queue.maxsize)
            while not queue.empty():
                lingering.put_nowait(queue.get_nowait())
            self._flush_queue = lingering
        await super()._flusher()

    async def _send_ping(self, future: asyncio.Future[Any] | None = None) -> None:
        """A PING (of `flush()`, `rtt()`, the keep-alive) queued behind what is pending, not written ahead of it.

        nats-py writes the PING straight to the socket, so a `flush()` could return before the commands
        still waiting for the flusher had reached the server — a subscription not yet in place when
        `subscribe(); flush()` returned. Lingering widened that window from one loop turn to three;
        in order, the PONG means what `flush()` promises. (While disconnected, nats-py's own way.)"""
        if not self.is_connected:
            await super()._send_ping(future)
            return
        self._pongs.append(future if future is not None else asyncio.get_running_loop().create_future())
        await self._send_command(PING_PROTO)
        await self._flush_pending()


async def connect(**options: Any) -> GatheringClient:
    """`nats.connect`, with the gathering client."""
    client = GatheringClient()
    await client.connect(**options)
    return client
