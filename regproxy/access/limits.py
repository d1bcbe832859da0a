"""Rate limits: requests per key (a client address, a principal) and window, and the login
throttle.

Where the counts live decides how exact a limit is: in Redis (``[limits] redis``), exact across
every replica; in one SQLite file in the directory the supervisor gives its ``--workers``,
exact across the workers of one proxy; else in the process. A shared store that fails is
replaced by the next one down (Redis by the workers' file or the process, the file by the
process) until it works again, logged once each way; a request is never failed or held up
for it (see ``_fallback``, ``_redis``, ``_shared_counts``). The window algorithm and its
reasons are in ``_counts``.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorCore, IReactorTime

from ..config import LimitsConfig, RateLimit
from ._counts import Counts, MemoryCounts, Slot
from ._fallback import FallbackCounts
from ._redis import CONNECT_TIMEOUT, RedisAddress, RedisCounts
from ._shared_counts import SharedCounts
from ._throttle import LoginThrottle

__all__ = [
    "SHARED_FILE",
    "LoginThrottle",
    "RateLimiter",
    "RedisAddress",
    "Verdict",
    "WindowLimiter",
    "build_limiter",
]

# The workers' file in the shared directory.
SHARED_FILE = "limits.sqlite"


@attrs.frozen
class Verdict:
    """One request counted: admitted or not, what is left of the window, when to come back.

    ``retry_after``: seconds until the window ends when refused (a request is admitted then);
    0 when admitted.
    """

    allowed: bool
    limit: RateLimit
    remaining: int
    retry_after: float

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``RateLimit-Limit``/``-Remaining`` as Docker Hub words them; ``Retry-After`` too
        when refused, in whole seconds rounded up (never 0: that would invite a retry now)."""
        window = int(self.limit.window)
        headers = [
            (b"RateLimit-Limit", str(self.limit).encode()),
            (b"RateLimit-Remaining", f"{self.remaining};w={window}".encode()),
        ]
        if not self.allowed:
            headers.append((b"Retry-After", b"%d" % max(1, math.ceil(self.retry_after))))
        return headers


class RateLimiter(Protocol):
    def take(self, key: str, limit: RateLimit) -> Deferred[Verdict]:
        """Count one request against ``key`` (opaque, any length) in the current window."""


class WindowLimiter:
    """A ``RateLimiter`` on fixed windows over a store of counts (see ``_counts``)."""

    def __init__(self, counts: Counts, clock: IReactorTime) -> None:
        self.counts = counts
        self.clock = clock

    def take(self, key: str, limit: RateLimit) -> Deferred[Verdict]:
        now = self.clock.seconds()
        slot = Slot.of(key, limit.window, now)
        return self.counts.increment(slot, now).addCallback(_verdict, limit, slot, now)

    def close(self) -> Deferred[None]:
        """Let go of the stores (the Redis connection, the workers' file)."""
        return self.counts.close()


def _verdict(count: int, limit: RateLimit, slot: Slot, now: float) -> Verdict:
    if count <= limit.count:
        return Verdict(True, limit, limit.count - count, 0.0)
    return Verdict(False, limit, 0, max(0.0, slot.end / 1000 - now))


def build_limiter(
    config: LimitsConfig, reactor: IReactorTime, shared_directory: str | None
) -> WindowLimiter:
    """The limiter for one process: counts in Redis when configured, else in the workers'
    ``shared_directory`` when given, else in memory; each falling back to the next.

    Closed when the reactor shuts down; one built again (a reload that changes ``redis``)
    should have the old one closed.
    """
    counts: Counts = MemoryCounts()
    where = "per process"
    if shared_directory is not None:
        path = os.path.join(shared_directory, SHARED_FILE)
        shared = SharedCounts(path)
        counts = FallbackCounts(shared, counts, what=f"the workers' file {path}", instead=where)
        where = "per proxy (across its workers)"
    if config.redis is not None:
        address = RedisAddress.parse(config.redis)
        endpoint = HostnameEndpoint(reactor, address.host, address.port, CONNECT_TIMEOUT)
        redis = RedisCounts(address, endpoint, reactor)
        counts = FallbackCounts(redis, counts, what=f"Redis at {address}", instead=where)
    limiter = WindowLimiter(counts, reactor)
    if IReactorCore.providedBy(reactor):
        reactor.addSystemEventTrigger("before", "shutdown", limiter.close)
    return limiter
