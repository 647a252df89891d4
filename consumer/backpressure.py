"""`maxActiveJobs`: hold a topic's next messages while the cluster already runs enough of its Jobs.

A held message stays un-applied and in-progress (not nak'ed, which would spend one of its
`MAX_DELIVER` deliveries per round), and flows as soon as a Job of its topic ends. The active set
comes from the executor's Job events (the watch sees Jobs created by every consumer process),
plus this process's own applies, counted at once so a burst cannot overshoot the limit.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, defaultdict

JobKey = tuple[str | None, str]  # (namespace, name)
REMEMBERED_FINISHED = 10_000


class ActiveJobs:
    def __init__(self) -> None:
        self._active: dict[str, set[JobKey]] = defaultdict(set)
        self._reserved: dict[str, int] = defaultdict(int)
        self._finished: OrderedDict[JobKey, None] = OrderedDict()
        self._changed = asyncio.Condition()

    def count(self, topic: str) -> int:
        return len(self._active[topic]) + self._reserved[topic]

    async def admit(self, topic: str, limit: int, jobs: int) -> None:
        """Wait until `jobs` more Jobs of `topic` fit under `limit`, and reserve them."""
        async with self._changed:
            # A message with more Jobs than the limit still runs, alone.
            await self._changed.wait_for(lambda: self.count(topic) == 0 or self.count(topic) + jobs <= limit)
            self._reserved[topic] += jobs

    async def applied(self, topic: str, reserved: int, keys: list[JobKey]) -> None:
        async with self._changed:
            self._reserved[topic] -= reserved
            self._active[topic].update(k for k in keys if k not in self._finished)
            self._changed.notify_all()

    async def started(self, topic: str, key: JobKey) -> None:
        if key not in self._finished:
            self._active[topic].add(key)

    async def finished(self, topic: str, key: JobKey) -> None:
        async with self._changed:
            self._active[topic].discard(key)
            self._finished[key] = None
            if len(self._finished) > REMEMBERED_FINISHED:
                self._finished.popitem(last=False)
            self._changed.notify_all()
