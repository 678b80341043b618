"""Async token-bucket rate limiting and retry backoff for HTTP backends."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time


class TokenBucket:
    """Classic token bucket: ``capacity`` units, refilled at ``rate`` units per second.

    ``await acquire(cost)`` waits until ``cost`` units are available and takes them. A cost
    larger than the capacity is clamped to it (it waits for a full bucket rather than forever).
    Use one bucket for requests/s (cost 1 per request) and one for tokens/min (cost = estimated
    tokens, with ``rate = tokens_per_min / 60``); :meth:`refund` gives back an overestimate.
    """

    def __init__(self, rate: float, capacity: float, *, clock=time.monotonic) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.rate = rate
        self.capacity = capacity
        self._level = capacity
        self._clock = clock
        self._updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._updated) * self.rate)
        self._updated = now

    async def acquire(self, cost: float = 1.0) -> None:
        cost = min(cost, self.capacity)
        async with self._lock:  # FIFO: one waiter refills at a time
            while True:
                self._refill()
                if self._level >= cost:
                    self._level -= cost
                    return
                await asyncio.sleep((cost - self._level) / self.rate)

    def refund(self, amount: float) -> None:
        if amount > 0:
            self._refill()
            self._level = min(self.capacity, self._level + amount)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: ``uniform(0, min(cap, base * 2**attempt))``.

    Full jitter (AWS architecture blog, "Exponential Backoff and Jitter", 2015) spreads the
    retries of many concurrent clients so they do not hit a recovering server in lockstep.
    """
    return rng.uniform(0.0, min(cap, base * (2.0**attempt)))


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
