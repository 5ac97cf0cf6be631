"""Rate limits for background work (re-announcing, pushing records, repair).

A token bucket: ``acquire`` waits just long enough to keep ``rate`` units per
second, with bursts of up to ``burst`` units. A rate of 0 or less means no
limit (tests run passes at full speed that way).
"""

from __future__ import annotations

import asyncio
import time


class Pacer:
    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = rate if burst is None else burst
        self._tokens = self.burst
        self._last = time.monotonic()

    async def acquire(self, amount: float = 1.0) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= amount
        if self._tokens < 0:
            # Concurrent callers each wait out their own deficit: one sleep, no loop.
            await asyncio.sleep(-self._tokens / self.rate)
