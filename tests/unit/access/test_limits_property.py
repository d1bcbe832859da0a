"""Any sequence of takes and waits, on every store: what a simple model of fixed windows
says, never more admitted in a window than the limit, never a negative remainder."""

from __future__ import annotations

import hashlib
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from regproxy.access._counts import Counts, MemoryCounts, bounded_key
from regproxy.access._redis import RedisAddress, RedisCounts
from regproxy.access._shared_counts import SharedCounts
from regproxy.access.limits import Verdict, WindowLimiter
from regproxy.config import RateLimit

from .limits_fakes import FakeEndpoint, FakeRedis
from .test_limits import result

KEYS = ["anonymous:192.0.2.1", "anonymous:2001:db8::1", "principal:alice"]
LIMITS = [RateLimit.parse(text) for text in ("3/1m", "1/10s", "5/2s")]

Step = tuple[str, int, int]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("take"), st.integers(0, len(KEYS) - 1), st.integers(0, 2)),
        st.tuples(st.just("wait"), st.integers(0, 90_000), st.just(0)),
    ),
    max_size=60,
)


@contextmanager
def memory(clock: Clock) -> Iterator[Counts]:
    yield MemoryCounts()


@contextmanager
def shared(clock: Clock) -> Iterator[Counts]:
    with tempfile.TemporaryDirectory() as directory:
        counts = SharedCounts(f"{directory}/limits.sqlite")
        yield counts
        counts.close()


@contextmanager
def redis(clock: Clock) -> Iterator[Counts]:
    endpoint = FakeEndpoint(FakeRedis(clock))
    counts = RedisCounts(RedisAddress("127.0.0.1"), endpoint, clock)
    assert counts.connected
    yield counts
    counts.close()


STORES: dict[str, Callable[[Clock], contextmanager[Counts]]] = {  # type: ignore[type-arg]
    "memory": memory,
    "shared": shared,
    "redis": redis,
}


def model_window(key: str, limit: RateLimit, now_ms: int) -> tuple[int, int]:
    """(index, end in ms) of the window holding now: aligned to the length, shifted by the
    first 8 bytes of the key's SHA-256."""
    length = int(limit.window * 1000)
    phase = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % length
    index = (now_ms - phase) // length
    return index, (index + 1) * length + phase


def check(store: str, start: int, plan: list[Step]) -> None:
    clock = Clock()
    clock.advance(1_700_000_000 + start / 1000)
    with STORES[store](clock) as counts:
        limiter = WindowLimiter(counts, clock)
        taken: Counter[tuple[str, RateLimit, int]] = Counter()
        admitted: Counter[tuple[str, RateLimit, int]] = Counter()
        for action, a, b in plan:
            if action == "wait":
                clock.advance(a / 1000)
                continue
            key, limit = KEYS[a], LIMITS[b]
            now_ms = int(clock.seconds() * 1000)
            index, end = model_window(key, limit, now_ms)
            taken[key, limit, index] += 1
            n = taken[key, limit, index]
            verdict: Verdict = result(limiter.take(key, limit))
            if n <= limit.count:
                assert verdict == Verdict(True, limit, limit.count - n, 0.0)
                admitted[key, limit, index] += 1
            else:
                assert (verdict.allowed, verdict.remaining) == (False, 0)
                assert abs(verdict.retry_after - (end / 1000 - clock.seconds())) < 1e-6
                assert 0 < verdict.retry_after <= limit.window
            assert verdict.remaining >= 0
        assert all(admitted[k] <= k[1].count for k in admitted)


@settings(max_examples=150, deadline=None)
@given(start=st.integers(0, 10**9), plan=steps)
def test_memory_counts_follow_the_model(start: int, plan: list[Step]) -> None:
    check("memory", start, plan)


@settings(max_examples=60, deadline=None)
@given(start=st.integers(0, 10**9), plan=steps)
def test_the_workers_file_follows_the_model(start: int, plan: list[Step]) -> None:
    check("shared", start, plan)


@settings(max_examples=100, deadline=None)
@given(start=st.integers(0, 10**9), plan=steps)
def test_redis_counts_follow_the_model(start: int, plan: list[Step]) -> None:
    check("redis", start, plan)


@given(st.lists(st.text(max_size=300), min_size=2, max_size=2, unique=True))
def test_bounded_keys_are_short_and_distinct(keys: list[str]) -> None:
    first, second = (bounded_key(key) for key in keys)
    assert len(first) <= 128 and len(second) <= 128
    assert first != second
