"""Failed logins per client address: ten a minute, then none until the minute has passed."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from regproxy.access._counts import bounded_key
from regproxy.access._throttle import CAPACITY, FAILURES, WINDOW, client_key
from regproxy.access.limits import LoginThrottle

ADDRESS = "192.0.2.7"


def throttle(**kwargs: int) -> tuple[LoginThrottle, Clock]:
    clock = Clock()
    clock.advance(1_700_000_000)
    return LoginThrottle(clock, **kwargs), clock  # type: ignore[arg-type]


def test_ten_failures_a_minute_then_refused_until_the_minute_has_passed() -> None:
    assert (FAILURES, WINDOW) == (10, 60.0)
    guard, clock = throttle()
    for _ in range(9):
        guard.failed(ADDRESS)
        clock.advance(5)
    assert guard.allowed(ADDRESS)
    guard.failed(ADDRESS)  # the tenth, 45 s after the first
    assert not guard.allowed(ADDRESS)
    clock.advance(14.9)
    assert not guard.allowed(ADDRESS)
    clock.advance(0.1)
    assert guard.allowed(ADDRESS)
    guard.failed(ADDRESS)  # a fresh window
    assert guard.allowed(ADDRESS)


def test_failures_spread_beyond_a_minute_never_refuse() -> None:
    guard, clock = throttle()
    for _ in range(100):
        guard.failed(ADDRESS)
        clock.advance(7)
        assert guard.allowed(ADDRESS)


def test_a_success_forgives_nothing() -> None:
    # An attacker with an account of their own must not reset the count between guesses.
    guard, _ = throttle()
    for _ in range(10):
        guard.failed(ADDRESS)
        guard.succeeded(ADDRESS)
    assert not guard.allowed(ADDRESS)


def test_addresses_are_counted_apart() -> None:
    guard, _ = throttle()
    for _ in range(10):
        guard.failed(ADDRESS)
    assert not guard.allowed(ADDRESS)
    assert guard.allowed("192.0.2.8")
    assert guard.allowed("2001:db8::1")


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::ffff", "2001:db8:1:2::/64"),
        ("unix:/run/regproxy.sock", "unix:/run/regproxy.sock"),
    ],
)
def test_a_client_is_its_address_or_its_ipv6_64(address: str, key: str) -> None:
    assert client_key(address) == key


def test_what_is_not_an_address_is_bounded() -> None:
    assert client_key("x" * 300) == bounded_key("x" * 300)
    assert len(client_key("x" * 300)) == 65


def test_one_ipv6_64_is_one_client() -> None:
    guard, _ = throttle()
    for i in range(10):
        guard.failed(f"2001:db8:0:1::{i:x}")
    assert not guard.allowed("2001:db8:0:1:ffff::1")
    assert guard.allowed("2001:db8:0:2::1")


def test_memory_stays_bounded_whatever_the_number_of_addresses() -> None:
    assert CAPACITY == 10000
    guard, clock = throttle(capacity=100)
    for i in range(100):
        for _ in range(10):
            guard.failed(f"10.0.0.{i}")
    clock.advance(30)
    for i in range(1000):
        guard.failed(f"10.1.{i // 256}.{i % 256}")
    assert len(guard) == 100
    # The earliest windows go first: the newest blocked clients stay blocked.
    guard2, clock2 = throttle(capacity=3)
    for address in ("a", "b", "c"):
        for _ in range(10):
            guard2.failed(address)
        clock2.advance(1)
    guard2.failed("d")
    assert guard2.allowed("a") and not guard2.allowed("b") and not guard2.allowed("c")


def test_ended_windows_are_forgotten_before_running_ones() -> None:
    guard, clock = throttle(capacity=2)
    guard.failed("old")
    clock.advance(30)
    for _ in range(10):
        guard.failed("blocked")
    clock.advance(31)  # "old" has ended, "blocked" runs on
    guard.failed("new")
    assert len(guard) == 2
    assert not guard.allowed("blocked")


def test_after_a_window_has_passed_ten_more_failures_refuse_again() -> None:
    guard, clock = throttle()
    for _ in range(10):
        guard.failed(ADDRESS)
    clock.advance(WINDOW)
    for _ in range(9):
        guard.failed(ADDRESS)
    assert guard.allowed(ADDRESS)
    guard.failed(ADDRESS)
    assert not guard.allowed(ADDRESS)


def test_ended_windows_are_forgotten_even_with_room_to_spare() -> None:
    guard, clock = throttle()
    guard.failed("a")
    clock.advance(WINDOW)
    guard.failed("b")
    assert len(guard) == 1


def answer(deferred: Deferred[bool]) -> bool | None:
    """What an attempt said at once; None while it waits."""
    said: list[bool] = []

    def keep(allowed: bool) -> bool:
        said.append(allowed)
        return allowed

    deferred.addCallback(keep)
    return said[0] if said else None


def test_a_password_being_checked_counts_until_its_check_ends() -> None:
    guard, clock = throttle(failures=2)
    assert answer(guard.attempt(ADDRESS)) and answer(guard.attempt("::ffff:" + ADDRESS))
    assert not guard.allowed(ADDRESS)
    third, fourth = guard.attempt(ADDRESS), guard.attempt(ADDRESS)
    assert answer(third) is None and answer(fourth) is None
    guard.succeeded(ADDRESS)  # a place for the third, which waited longest
    assert answer(third) is True and answer(fourth) is None
    guard.failed(ADDRESS)
    assert answer(fourth) is None  # one failure and the third still being checked
    guard.failed(ADDRESS)  # the window is full: the fourth is refused
    assert answer(fourth) is False
    assert answer(guard.attempt(ADDRESS)) is False
    assert guard.retry_after(ADDRESS) == WINDOW
    clock.advance(0.5)
    assert guard.retry_after(ADDRESS) == WINDOW  # rounded up: never an invitation too soon
    clock.advance(WINDOW - 1)
    assert guard.retry_after(ADDRESS) == 1
    clock.advance(0.5)
    # Nothing left being checked: a fresh window lets two through again.
    assert answer(guard.attempt(ADDRESS)) and answer(guard.attempt(ADDRESS))
    assert answer(guard.attempt(ADDRESS)) is None


def test_the_limit_counts_failures_and_checks_together() -> None:
    guard, _ = throttle(failures=3)
    guard.failed(ADDRESS)
    assert answer(guard.attempt(ADDRESS)) and answer(guard.attempt(ADDRESS))
    assert answer(guard.attempt(ADDRESS)) is None
    assert answer(guard.attempt("192.0.2.8")) is True


def test_an_attempt_no_longer_waiting_is_forgotten() -> None:
    guard, _ = throttle(failures=1)
    assert answer(guard.attempt(ADDRESS))
    waiting = guard.attempt(ADDRESS)
    waiting.addErrback(lambda failure: None)
    waiting.cancel()
    then = guard.attempt(ADDRESS)
    guard.succeeded(ADDRESS)
    assert answer(then) is True and not guard.allowed(ADDRESS)
    guard.succeeded(ADDRESS)
    assert guard.allowed(ADDRESS)


def test_a_refused_address_never_waits() -> None:
    guard, _ = throttle(failures=1)
    guard.failed(ADDRESS)
    assert answer(guard.attempt(ADDRESS)) is False
