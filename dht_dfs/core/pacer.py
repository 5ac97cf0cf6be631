"""Rate limits for background work (re-announcing, pushing records, repair).

A token bucket with time passed in, so it holds no clock and no event loop:
``reserve(amount, now)`` takes ``amount`` units and returns how many seconds
the caller must wait to stay within ``rate`` units per second, with bursts
of up to ``burst`` units. A rate of 0 or less means no limit (tests run
passes at full speed that way). Callers sleep for the returned delay.
"""

from __future__ import annotations


class Pacer:
    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = rate if burst is None else burst
        self._tokens = self.burst
        self._last: float | None = None

    def reserve(self, amount: float, now: float) -> float:
        """Take ``amount`` units at time ``now``; the seconds to wait before using them."""
        if self.rate <= 0:
            return 0.0
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= amount
        # Concurrent callers each wait out their own deficit: one sleep, no loop.
        return max(0.0, -self._tokens / self.rate)
