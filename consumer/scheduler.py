"""Publishing the topics that have a `schedule` (§3, §11), from every consumer process at once.

Each process computes the ticks itself and publishes each one with the JetStream message id
`gitfaas-schedule:<topic>:<tick>`: the stream's duplicate window (2 minutes) stores the first and
drops the others, so a tick is published once however many consumers run, with no leader to elect.
Each scheduled request carries `Gitfaas-Schedule: <tick>`. The last tick published is kept in the
`gitfaas_config` bucket (`schedules.<topic>`), so a tick is not published again by a process that
comes late (after the duplicate window) and, after downtime, **at most one missed tick is run**: a
process that starts finds the tick it missed most recently (if any was missed since the last one
published) and publishes that one at once; earlier missed ticks are skipped. A schedule seen for the
first time starts at its next tick.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from nats.js.errors import KeyNotFoundError, NotFoundError
from prometheus_client import Counter

from gitfaas.logs import get_logger
from gitfaas.message import request_headers
from gitfaas.schedules import HEADER_SCHEDULE, next_tick, previous_tick, tick_text
from gitfaas.subjects import HEADER_MSG_ID, Subjects, new_request_id

log = get_logger("gitfaas.schedules")

TICKS = Counter("gitfaas_schedule_ticks_total",
                "Scheduled publishes stored, by topic (each tick once, whichever consumer stored it)", ["topic"])
IDLE_SECONDS = 1.0  # how often a process without due ticks looks at the configuration again
RECORD_PREFIX = "schedules."


def message_id(topic: str, tick: float) -> str:
    return f"gitfaas-schedule:{topic}:{tick_text(tick)}"


def body_of(message: Any) -> bytes:
    """A topic's `message`: a string is the body as it is; anything else is sent as JSON."""
    if message is None:
        return b""
    if isinstance(message, str):
        return message.encode()
    return json.dumps(message).encode()


class Scheduler:
    def __init__(self, consumer: Any, clock: Callable[[], float] = time.time) -> None:
        self.consumer = consumer
        self.clock = clock
        self._next: dict[str, float] = {}
        self._specs: dict[str, tuple[str, str | None]] = {}

    def _scheduled(self) -> dict[str, Any]:
        config = self.consumer.config
        if config is None:
            return {}
        return {name: topic for name, topic in config.topics.items() if getattr(topic, "schedule", None)}

    async def run(self) -> None:
        while True:
            try:
                delay = await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — NATS away, say: try again shortly
                log.warning("schedules not served this round", error=str(exc) or type(exc).__name__)
                delay = IDLE_SECONDS
            await asyncio.sleep(delay)

    async def _round(self) -> float:
        """Publish what is due; return how long to sleep."""
        topics = self._scheduled()
        for name in list(self._next):
            if name not in topics or self._specs.get(name) != (topics[name].schedule, topics[name].timezone):
                del self._next[name]  # gone or changed: computed again below
        now = self.clock()
        for name, topic in topics.items():
            if name not in self._next:
                self._specs[name] = (topic.schedule, topic.timezone)
                self._next[name] = await self._first_tick(name, topic, now)
        for name, tick in list(self._next.items()):
            if tick <= now:
                await self.publish(name, topics[name], tick)
                self._next[name] = next_tick(topics[name].schedule, topics[name].timezone, max(tick, now))
        if not self._next:
            return IDLE_SECONDS
        return max(0.0, min(IDLE_SECONDS, min(self._next.values()) - self.clock()))

    async def _first_tick(self, name: str, topic: Any, now: float) -> float:
        """The next tick, or — when a tick was missed since the last one published — the latest missed."""
        last = await self._last_published(name)
        missed = previous_tick(topic.schedule, topic.timezone, now)
        if last is not None and missed > last + 1e-6 and missed < now:
            log.info("publishing the tick missed while no consumer ran", topic=name, tick=tick_text(missed))
            return missed
        return next_tick(topic.schedule, topic.timezone, now)

    async def _last_published(self, name: str) -> float | None:
        bucket = self.consumer.repository.bucket
        if bucket is None:
            return None
        try:
            entry = await bucket.get(RECORD_PREFIX + name)
        except (KeyNotFoundError, NotFoundError):
            return None
        try:
            return float(json.loads(entry.value)["tick"])
        except (TypeError, ValueError, KeyError):
            return None

    async def publish(self, name: str, topic: Any, tick: float) -> bool:
        """One tick of one topic; True when this process stored it (False: another one had)."""
        last = await self._last_published(name)
        if last is not None and last >= tick - 1e-6:
            return False  # published already, longer ago than the duplicate window remembers
        js = self.consumer.js
        settings = self.consumer.settings
        headers = request_headers(new_request_id(), idempotency_key=message_id(name, tick))
        headers[HEADER_SCHEDULE] = tick_text(tick)
        assert headers[HEADER_MSG_ID]
        ack = await js.publish(Subjects(settings.subject_prefix).topic(name), body_of(topic.message),
                               headers=headers, stream=settings.stream)
        bucket = self.consumer.repository.bucket
        if bucket is not None:
            await bucket.put(RECORD_PREFIX + name, json.dumps({"tick": tick, "at": tick_text(tick)}).encode())
        if ack.duplicate:
            return False
        TICKS.labels(name).inc()
        log.info("scheduled publish", topic=name, tick=tick_text(tick), stream_seq=ack.seq,
                 request_id=headers["Gitfaas-Request-Id"])
        return True
