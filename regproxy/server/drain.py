"""The graceful stop of a serving process: readiness first, then in-flight requests, then
the upstream pools.

The site, the readiness flag and the pools are described by what the drain needs of them
(``Serving``, ``Ready``, ``Pool``), so this module imports nothing of the web or upstream
packages and its tests can hand in plain objects.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import Logger


class Channel(Protocol):
    """An open client connection (``twisted.web.http.HTTPChannel``)."""

    transport: Any

    def loseConnection(self) -> None: ...


class Serving(Protocol):
    """What the drain reads of the site: requests in flight and open client connections."""

    active: int

    @property
    def open_channels(self) -> Collection[Channel]: ...


class Ready(Protocol):
    draining: bool


class Pool(Protocol):
    def closeCachedConnections(self) -> Deferred[None]: ...


class Drain(Service):
    """On stop: turn /readyz to 503 at once, let the listeners accept for ``delay`` seconds
    (they close themselves, see ``listen.Listener``), then wait for in-flight requests up to
    ``grace`` seconds, then close the upstream pools (forwarding, and follow mode's)."""

    log = Logger()

    def __init__(
        self,
        *,
        site: Serving,
        readiness: Ready,
        pools: Sequence[Pool],
        grace: float,
        reactor: Any,
        delay: float = 0.0,
    ) -> None:
        self.site = site
        self.readiness = readiness
        self.pools = tuple(pools)
        self.grace = grace
        self.reactor = reactor
        self.delay = delay
        # False when the grace period ended with requests unfinished.
        self.drained = True

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.readiness.draining = True
        return ensureDeferred(self._drain())

    async def _drain(self) -> None:
        if self.delay:
            self.log.info(
                "draining: /readyz answers 503; still accepting for {delay} seconds",
                delay=self.delay,
            )
            await deferLater(self.reactor, self.delay, lambda: None)
        deadline = self.reactor.seconds() + self.grace
        if self.site.active:
            self.log.info(
                "draining {count} requests for up to {grace} seconds",
                count=self.site.active,
                grace=self.grace,
            )
        while self.site.active and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.1, lambda: None)
        if self.site.active:
            self.drained = False
            self.log.warn(
                "grace period over with {count} requests unfinished", count=self.site.active
            )
        # A finished request may still have its last bytes in the connection's write
        # buffer (a slow client): the reactor's shutdown would cut those connections at
        # once. Closing them gracefully first lets every buffer flush, within the grace.
        # The channel's own loseConnection, not its transport's: the channel is the
        # transport's registered producer, and a transport whose producer was paused by
        # a full buffer only resumes it once the buffer has flushed, and never closes
        # (the drain then waited out the whole grace after the last transfer).
        for channel in list(self.site.open_channels):
            if channel.transport is not None:
                channel.loseConnection()
        while self.site.open_channels and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05, lambda: None)
        if self.site.open_channels:
            self.log.warn(
                "grace period over with {count} client connections still flushing",
                count=len(self.site.open_channels),
            )
        await gatherResults([pool.closeCachedConnections() for pool in self.pools])
