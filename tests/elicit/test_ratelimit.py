"""Token bucket, backoff and Retry-After parsing (deterministic: a fake clock)."""

from __future__ import annotations

import asyncio
import email.utils
import random

import pytest

from kdforge.elicit.backends import ratelimit
from kdforge.elicit.backends.ratelimit import TokenBucket, backoff_delay, parse_retry_after


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_token_bucket_spaces_requests_at_the_configured_rate(monkeypatch):
    clock = FakeClock()

    async def fake_sleep(d):
        clock.t += d

    monkeypatch.setattr(ratelimit.asyncio, "sleep", fake_sleep)
    bucket = TokenBucket(rate=2.0, capacity=2.0, clock=clock)

    async def go():
        for _ in range(6):
            await bucket.acquire(1)

    asyncio.run(go())
    assert clock.t == pytest.approx(2.0)  # burst of 2, then 4 more at 2/s


def test_token_bucket_clamps_costs_above_capacity_and_refunds(monkeypatch):
    clock = FakeClock()

    async def fake_sleep(d):
        clock.t += d

    monkeypatch.setattr(ratelimit.asyncio, "sleep", fake_sleep)
    bucket = TokenBucket(rate=10.0, capacity=100.0, clock=clock)
    asyncio.run(bucket.acquire(500))  # clamped to 100: the full bucket, no wait
    assert clock.t == 0.0
    bucket.refund(50)
    asyncio.run(bucket.acquire(50))
    assert clock.t == 0.0


def test_backoff_is_exponential_with_full_jitter_and_capped():
    rng = random.Random(0)
    for attempt in range(8):
        d = [backoff_delay(attempt, 0.5, 4.0, rng) for _ in range(200)]
        assert min(d) >= 0 and max(d) <= min(4.0, 0.5 * 2**attempt)
    assert max(backoff_delay(6, 0.5, 4.0, rng) for _ in range(200)) > 2.0


def test_retry_after_accepts_seconds_and_http_dates():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    date = email.utils.formatdate(1000.0 + 30, usegmt=True)
    assert parse_retry_after(date, now=1000.0) == pytest.approx(30.0)
