"""The consumer's pace against the API server as a whole (issue 14).

Under API Priority and Fairness an API server that is too busy answers `429 Too Many Requests`
with `Retry-After`. Delaying only the message that got the 429 would leave every other apply
running at full speed into the same wall. Instead, every apply of the executor goes through one
`ApiThrottle`:

- after a 429, *no* apply starts until `Retry-After` has passed;
- the number of applies in flight is halved (at least 1), and grows back by one for every
  `limit` applies that succeed (additive increase, multiplicative decrease, as TCP does).

The message that got the 429 waits with the others and is sent again (it does not spend one of
its `MAX_DELIVER` deliveries); only after `MAX_THROTTLED_ATTEMPTS` 429s in a row is it handed back
to JetStream as a transient failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from consumer import metrics

MAX_RETRY_AFTER_SECONDS = 60.0
DEFAULT_RETRY_AFTER_SECONDS = 1.0
MAX_THROTTLED_ATTEMPTS = 6


def retry_after_seconds(value: str | None) -> float:
    """`Retry-After` in seconds (the API server sends whole seconds); 1 s when absent or unreadable."""
    try:
        seconds = float(value) if value is not None else DEFAULT_RETRY_AFTER_SECONDS
    except ValueError:
        seconds = DEFAULT_RETRY_AFTER_SECONDS
    return min(MAX_RETRY_AFTER_SECONDS, max(0.0, seconds))


class ApiThrottle:
    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max(1, max_in_flight)
        self.limit = float(self.max_in_flight)
        self.in_flight = 0
        self.paused_until = 0.0  # event loop time
        self.throttled = 0  # 429s seen
        self._changed = asyncio.Condition()
        metrics.APPLY_LIMIT.set(self.max_in_flight)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._enter()
        try:
            yield
        finally:
            async with self._changed:
                self.in_flight -= 1
                self._changed.notify_all()

    async def _enter(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pause = self.paused_until - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
                continue
            async with self._changed:
                if self.paused_until <= loop.time() and self.in_flight < int(self.limit):
                    self.in_flight += 1
                    return
                await self._changed.wait()

    def throttled_for(self, seconds: float) -> None:
        """A 429 asked us to wait `seconds`: pause every apply and halve the applies in flight."""
        loop = asyncio.get_running_loop()
        self.paused_until = max(self.paused_until, loop.time() + seconds)
        self.limit = max(1.0, self.limit / 2)
        self.throttled += 1
        metrics.API_THROTTLED.inc()
        metrics.APPLY_LIMIT.set(int(self.limit))

    def succeeded(self) -> None:
        if self.limit < self.max_in_flight:
            self.limit = min(float(self.max_in_flight), self.limit + 1 / self.limit)
            metrics.APPLY_LIMIT.set(int(self.limit))
