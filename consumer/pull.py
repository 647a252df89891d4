"""A continuous pull from the durable consumer: messages flow the moment they are stored.

nats-py 2.16 only offers `fetch()`, which for a batch waits until the batch is full or its
timeout ends, so a lone message would wait seconds. The newer NATS clients' `consume()` keeps a
credit of requested messages topped up instead; this is that, written on nats-py's plain
subscription API (the one place we chose hand-written code over the library's, for latency).

Credit = capacity - requested-but-undelivered - delivered-but-unfinished: the process never holds
more messages than it can work on, so other consumer processes get the rest.
"""

from __future__ import annotations

import asyncio
import json
import time

from nats.aio.client import Client
from nats.aio.msg import Msg

from gitfaas.logs import get_logger
from gitfaas.natsconn import is_stored_message

log = get_logger(__name__)


class ContinuousPull:
    def __init__(
        self,
        nc: Client,
        stream: str,
        durable: str,
        capacity: int,
        *,
        expires: float = 30.0,
        heartbeat: float = 5.0,
    ) -> None:
        self._nc = nc
        self._api_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._capacity = max(1, capacity)
        self._expires = expires
        self._heartbeat = heartbeat
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._requested = 0
        self._in_hand = 0
        self._last_seen = time.monotonic()
        self._inbox = ""
        self._sub = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_message)
        self._watchdog = asyncio.create_task(self._watch(), name="pull-watchdog")
        await self._top_up()

    async def get(self) -> Msg:
        return await self._queue.get()

    async def release(self) -> None:
        """A message is finished (acked, naked or terminated): its credit comes back."""
        self._in_hand -= 1
        await self._top_up()

    async def reset(self) -> None:
        """After a reconnect the server has forgotten our pull requests: ask anew."""
        self._requested = 0
        await self._top_up()

    async def stop(self) -> list[Msg]:
        """Stop pulling; return delivered messages nobody started, for the caller to give back."""
        self._stopped = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001 — the connection may already be closed
                pass
        left: list[Msg] = []
        while not self._queue.empty():
            left.append(self._queue.get_nowait())
        return left

    async def _top_up(self) -> None:
        if self._stopped or not self._nc.is_connected:
            return
        want = self._capacity - self._requested - self._in_hand
        # Ask in chunks, not one message at a time, unless nothing at all is outstanding.
        if want <= 0 or (self._requested > 0 and want < max(1, self._capacity // 4)):
            return
        request = {
            "batch": want,
            "expires": int(self._expires * 1e9),
            "idle_heartbeat": int(self._heartbeat * 1e9),
        }
        self._requested += want
        try:
            await self._nc.publish(self._api_subject, json.dumps(request).encode(), reply=self._inbox)
        except Exception as exc:  # noqa: BLE001 — the watchdog asks again once connected
            self._requested -= want
            log.warning("pull request not sent", error=str(exc) or type(exc).__name__)

    async def _on_message(self, msg: Msg) -> None:
        self._last_seen = time.monotonic()
        if is_stored_message(msg):  # whatever headers it carries (`Status` included): it was published
            self._requested = max(0, self._requested - 1)
            self._in_hand += 1
            self._queue.put_nowait(msg)
            return
        status = msg.headers.get("Status") if msg.headers else None
        if status in (None, "100"):  # idle heartbeat: the request is alive
            return
        # 404/408/409: a request ended; the header says how many of its messages never came.
        pending = msg.headers.get("Nats-Pending-Messages") if msg.headers else None
        if pending is not None and pending.isdigit():
            self._requested = max(0, self._requested - int(pending))
        else:
            self._requested = 0
        if status == "409":
            log.info("pull request ended by server", description=msg.headers.get("Description", ""))
        await self._top_up()

    async def _watch(self) -> None:
        """Heartbeats stop when the server lost our requests (restart, failover): ask anew."""
        while not self._stopped:
            await asyncio.sleep(self._heartbeat)
            silent = time.monotonic() - self._last_seen
            if self._requested and silent > 3 * self._heartbeat:
                log.info("pull requests went silent, renewing", silent_s=round(silent, 1))
                self._requested = 0
                self._last_seen = time.monotonic()
            await self._top_up()
