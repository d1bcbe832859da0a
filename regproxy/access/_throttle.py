"""Failed logins per client address: guessing passwords gets slow.

Per process, on purpose: a worker or replica more multiplies an attacker's allowance by a small
constant, which a throttle of ten a minute survives, and a login never waits for a shared store.
"""

from __future__ import annotations

import collections
import ipaddress
import math

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from ._counts import bounded_key

FAILURES = 10
WINDOW = 60.0
# Addresses remembered at most: an attacker with many addresses must not grow memory without
# bound. Beyond, the address whose window started first is forgotten.
CAPACITY = 10000


def client_key(address: str) -> str:
    """The part of an address one client controls: IPv6 by /64 (anyone holds a whole /64),
    IPv4 (also IPv4-mapped IPv6) by address; anything else as it is, bounded."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return bounded_key(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LoginThrottle:
    """After ``failures`` failed logins from an address within ``window`` seconds of its
    first, that address may not try again until the window has passed.

    A success forgives nothing: with an account of their own, an attacker could otherwise
    interleave good logins with guesses at someone else's password.

    A password being checked counts as a failure until it is known not to be one: guesses
    sent in parallel would otherwise all pass the throttle before the first had failed. One
    that finds no room waits for a check to end (:meth:`attempt`): refused at once, a burst of
    good logins from behind one NAT would be turned away for no failure at all.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        failures: int = FAILURES,
        window: float = WINDOW,
        capacity: int = CAPACITY,
    ) -> None:
        self.clock = clock
        self.failures = failures
        self.window = window
        self.capacity = capacity
        # client -> (start of its window, failures in it); the earliest start first.
        self._failed: collections.OrderedDict[str, tuple[float, int]] = collections.OrderedDict()
        # client -> passwords of it being checked now, and attempts waiting for room (both
        # bounded by the requests in flight).
        self._checking: dict[str, int] = {}
        self._waiting: dict[str, collections.deque[Deferred[bool]]] = {}

    def __len__(self) -> int:
        return len(self._failed)

    def allowed(self, address: str) -> bool:
        """Would a password of this address be checked at once?"""
        key = client_key(address)
        return self._failures(key) + self._checking.get(key, 0) < self.failures

    def attempt(self, address: str) -> Deferred[bool]:
        """Fires with whether this address may try a password: False once its failures fill
        the window; True once there is room beside the passwords of it being checked, which
        the new one then joins until :meth:`failed` or :meth:`succeeded` (call one)."""
        key = client_key(address)
        if self._failures(key) >= self.failures:
            return succeed(False)
        if key not in self._waiting and self.allowed(address):
            self._checking[key] = self._checking.get(key, 0) + 1
            return succeed(True)
        waiter: Deferred[bool] = Deferred(lambda cancelled: self._forget(key, cancelled))
        self._waiting.setdefault(key, collections.deque()).append(waiter)
        return waiter

    def retry_after(self, address: str) -> int:
        """Whole seconds until a refused address may try again (at least 1)."""
        entry = self._failed.get(client_key(address))
        left = entry[0] + self.window - self.clock.seconds() if entry is not None else 0.0
        return max(1, math.ceil(left))

    def failed(self, address: str) -> None:
        """A password from this address was wrong."""
        key, now = client_key(address), self.clock.seconds()
        entry = self._failed.get(key)
        if entry is not None and now < entry[0] + self.window:
            self._failed[key] = (entry[0], entry[1] + 1)
        else:
            self._failed.pop(key, None)
            self._make_room(now)
            self._failed[key] = (now, 1)
        # Counted first: a waiting attempt must see this failure.
        self._checked(key)

    def succeeded(self, address: str) -> None:
        """A login from this address succeeded: its check no longer counts, and no failure
        is forgiven (see the class)."""
        self._checked(client_key(address))

    def _failures(self, key: str) -> int:
        entry = self._failed.get(key)
        if entry is None or self.clock.seconds() >= entry[0] + self.window:
            return 0
        return entry[1]

    def _checked(self, key: str) -> None:
        checking = self._checking.pop(key, 0)
        if checking > 1:
            self._checking[key] = checking - 1
        waiting = self._waiting.get(key)
        # Each waiter told resumes its login at once, and may end it (and come here) at once.
        while waiting:
            failures = self._failures(key)
            if failures < self.failures and failures + self._checking.get(key, 0) >= self.failures:
                break
            waiter = waiting.popleft()
            if failures < self.failures:
                self._checking[key] = self._checking.get(key, 0) + 1
            waiter.callback(failures < self.failures)
        if waiting is not None and not waiting and self._waiting.get(key) is waiting:
            del self._waiting[key]

    def _forget(self, key: str, waiter: Deferred[bool]) -> None:
        """A waiting attempt whose client has left."""
        waiting = self._waiting.get(key)
        if waiting is not None and waiter in waiting:
            waiting.remove(waiter)
            if not waiting:
                del self._waiting[key]

    def _make_room(self, now: float) -> None:
        entries = self._failed
        while entries:
            start, _ = next(iter(entries.values()))
            if now < start + self.window and len(entries) < self.capacity:
                break
            entries.popitem(last=False)
