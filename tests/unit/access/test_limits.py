"""Rate limits in one process: windows, what is left, when to come back, the headers, keys."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from regproxy.access._counts import MemoryCounts, Slot, bounded_key
from regproxy.access.limits import SHARED_FILE, Verdict, WindowLimiter, build_limiter
from regproxy.config import LimitsConfig, RateLimit

LIMIT = RateLimit.parse("3/1m")
KEY = "anonymous:192.0.2.7"


def result(deferred: Deferred[Verdict]) -> Verdict:
    """The verdict of a take that needs no I/O (answered at once)."""
    answers: list[Verdict] = []
    deferred.addCallback(answers.append)
    assert answers, "the take did not answer at once"
    return answers[0]


def limiter(clock: Clock | None = None) -> tuple[WindowLimiter, Clock]:
    clock = clock or Clock()
    clock.advance(1_700_000_000)  # a wall-clock time, as reactor.seconds() gives
    return WindowLimiter(MemoryCounts(), clock), clock


def window_start(key: str, limit: RateLimit, now: float) -> float:
    return Slot.of(key, limit.window, now).start / 1000


def test_the_count_is_admitted_then_refused_until_the_window_ends() -> None:
    limits, clock = limiter()
    start = window_start(KEY, LIMIT, clock.seconds())
    clock.advance(start + 20 - clock.seconds())  # 20 s into the window
    verdicts = [result(limits.take(KEY, LIMIT)) for _ in range(5)]
    assert [(v.allowed, v.remaining, v.retry_after) for v in verdicts] == [
        (True, 2, 0.0),
        (True, 1, 0.0),
        (True, 0, 0.0),
        (False, 0, pytest.approx(40.0)),
        (False, 0, pytest.approx(40.0)),
    ]
    assert all(v.limit == LIMIT for v in verdicts)
    clock.advance(39.9)
    assert result(limits.take(KEY, LIMIT)).retry_after == pytest.approx(0.1)
    clock.advance(0.1)
    assert result(limits.take(KEY, LIMIT)) == Verdict(True, LIMIT, 2, 0.0)


def test_keys_are_counted_apart() -> None:
    limits, _ = limiter()
    for _ in range(3):
        result(limits.take(KEY, LIMIT))
    assert not result(limits.take(KEY, LIMIT)).allowed
    assert result(limits.take("anonymous:192.0.2.8", LIMIT)).remaining == 2
    assert result(limits.take("principal:" + KEY, LIMIT)).remaining == 2


def test_a_changed_limit_counts_in_a_window_of_its_own() -> None:
    limits, _ = limiter()
    for _ in range(3):
        result(limits.take(KEY, LIMIT))
    assert result(limits.take(KEY, RateLimit.parse("3/2m"))).remaining == 2
    # A higher count over the same window admits more at once (a reload that raises it).
    assert result(limits.take(KEY, RateLimit.parse("5/1m"))) == Verdict(
        True, RateLimit.parse("5/1m"), 1, 0.0
    )


def test_windows_are_aligned_to_their_length_with_a_phase_per_key() -> None:
    now = 1_700_000_123.4567
    slots = [Slot.of(f"anonymous:198.51.100.{i}", 21600, now) for i in range(20)]
    for slot in slots:
        assert slot.length == 21_600_000
        assert slot.start <= now * 1000 < slot.end
        # The same boundaries at any time in the window, and the next window follows.
        assert Slot.of(slot.key, 21600, slot.start / 1000) == slot
        assert Slot.of(slot.key, 21600, (slot.end - 1) / 1000) == slot
        assert Slot.of(slot.key, 21600, slot.end / 1000).start == slot.end
    # Spread: clients refused together do not all come back in the same second.
    assert len({slot.start for slot in slots}) == 20


def test_the_phase_is_the_keys_sha256_modulo_the_window() -> None:
    slot = Slot.of(KEY, 60, 0.0)
    phase = int.from_bytes(hashlib.sha256(KEY.encode()).digest()[:8], "big") % 60000
    assert slot.start % 60000 == phase


def test_headers_of_an_admitted_request() -> None:
    limit = RateLimit.parse("100/6h")
    assert Verdict(True, limit, 76, 0.0).headers() == [
        (b"RateLimit-Limit", b"100;w=21600"),
        (b"RateLimit-Remaining", b"76;w=21600"),
    ]


@pytest.mark.parametrize(
    ("retry_after", "header"), [(0.0, b"1"), (0.2, b"1"), (1.0, b"1"), (59.01, b"60")]
)
def test_a_refusal_says_when_to_retry_in_whole_seconds_at_least_one(
    retry_after: float, header: bytes
) -> None:
    limit = RateLimit.parse("100/6h")
    assert Verdict(False, limit, 0, retry_after).headers() == [
        (b"RateLimit-Limit", b"100;w=21600"),
        (b"RateLimit-Remaining", b"0;w=21600"),
        (b"Retry-After", header),
    ]


@pytest.mark.parametrize(
    "key", ["anonymous:192.0.2.7", "principal:alice", "anonymous:2001:db8::1", "a" * 128]
)
def test_short_plain_keys_are_kept(key: str) -> None:
    assert bounded_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "principal:" + "x" * 119,
        "principal:github:repo:acme/a b",
        "principal:bjørn",
        "principal:tab\there",
        "#" + "0" * 64,
        "",
    ],
)
def test_long_or_awkward_keys_become_their_sha256(key: str) -> None:
    if key == "":
        assert bounded_key(key) == ""  # empty is short and plain
        return
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert bounded_key(key) == "#" + digest


def test_a_hashed_key_is_counted_as_itself() -> None:
    limits, _ = limiter()
    long_key = "principal:github:" + "repo:acme/app:ref:refs/heads/main" * 20
    for _ in range(3):
        result(limits.take(long_key, LIMIT))
    assert not result(limits.take(long_key, LIMIT)).allowed
    assert result(limits.take(long_key + "x", LIMIT)).allowed


def test_memory_counts_forget_ended_windows_first_then_the_least_recently_used() -> None:
    counts, clock = MemoryCounts(capacity=3), Clock()
    limits = WindowLimiter(counts, clock)
    short = RateLimit.parse("3/1s")
    result(limits.take("old", short))
    clock.advance(1.0)
    for key in ("a", "b"):
        result(limits.take(key, LIMIT))
    result(limits.take("a", LIMIT))  # b is now the least recently used
    result(limits.take("c", LIMIT))  # "old" has ended: it goes, nothing else
    assert len(counts) == 3
    assert result(limits.take("a", LIMIT)).remaining == 0
    result(limits.take("d", LIMIT))  # full: b goes
    assert len(counts) == 3
    assert result(limits.take("b", LIMIT)).remaining == 2
    assert result(limits.take("a", LIMIT)).allowed is False


def test_many_keys_never_grow_memory_past_its_capacity() -> None:
    counts = MemoryCounts(capacity=100)
    limits = WindowLimiter(counts, Clock())
    for i in range(1000):
        result(limits.take(f"anonymous:2001:db8::{i:x}", LIMIT))
    assert len(counts) == 100


def test_without_a_store_the_limiter_counts_in_memory() -> None:
    reactor = MemoryReactorClock()
    limits = build_limiter(LimitsConfig(anonymous=LIMIT), reactor, None)
    assert isinstance(limits.counts, MemoryCounts)
    assert [result(limits.take(KEY, LIMIT)).remaining for _ in range(3)] == [2, 1, 0]


def test_limiters_on_one_shared_directory_count_together(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    first = build_limiter(LimitsConfig(), reactor, str(tmp_path))
    second = build_limiter(LimitsConfig(), reactor, str(tmp_path))
    assert result(first.take(KEY, LIMIT)).remaining == 2
    assert result(second.take(KEY, LIMIT)).remaining == 1
    assert result(first.take(KEY, LIMIT)).remaining == 0
    assert not result(second.take(KEY, LIMIT)).allowed
    assert (tmp_path / SHARED_FILE).exists()
    for each in (first, second):
        result_of_close: list[object] = []
        each.close().addCallback(result_of_close.append)
        assert result_of_close == [None]


def test_the_limiter_is_closed_when_the_reactor_shuts_down(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    limits = build_limiter(LimitsConfig(), reactor, str(tmp_path))
    assert [call for call, _, _ in reactor.triggers["before"]["shutdown"]] == [limits.close]


def test_a_bad_redis_address_is_refused_with_a_sentence() -> None:
    with pytest.raises(ValueError, match=r"redis: only redis:// addresses"):
        build_limiter(LimitsConfig(redis="http://127.0.0.1:6379"), MemoryReactorClock(), None)


def test_memory_counts_forget_ended_windows_even_with_room_to_spare() -> None:
    counts, clock = MemoryCounts(), Clock()
    limits = WindowLimiter(counts, clock)
    result(limits.take("old", RateLimit.parse("3/1s")))
    clock.advance(1.0)
    result(limits.take("new", LIMIT))
    assert len(counts) == 1
