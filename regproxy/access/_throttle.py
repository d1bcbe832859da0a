"""Failed logins per client address: guessing passwords gets slow.

Per process, on purpose: a worker or replica more multiplies an attacker's allowance by a small
constant, which a throttle of ten a minute survives, and a login never waits for a shared store.
"""

from __future__ import annotations

import collections
import ipaddress

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

    def __len__(self) -> int:
        return len(self._failed)

    def allowed(self, address: str) -> bool:
        """May this address try a password now? (Ask before checking it.)"""
        entry = self._failed.get(client_key(address))
        if entry is None:
            return True
        start, count = entry
        return count < self.failures or self.clock.seconds() >= start + self.window

    def failed(self, address: str) -> None:
        """A password from this address was wrong."""
        key, now = client_key(address), self.clock.seconds()
        entry = self._failed.get(key)
        if entry is not None and now < entry[0] + self.window:
            self._failed[key] = (entry[0], entry[1] + 1)
            return
        self._failed.pop(key, None)
        self._make_room(now)
        self._failed[key] = (now, 1)

    def succeeded(self, address: str) -> None:
        """A login from this address succeeded: nothing changes (see the class)."""

    def _make_room(self, now: float) -> None:
        entries = self._failed
        while entries:
            start, _ = next(iter(entries.values()))
            if now < start + self.window and len(entries) < self.capacity:
                break
            entries.popitem(last=False)
