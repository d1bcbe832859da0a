"""The cache directory's upkeep while a process serves from it: periodic rescans (other
processes on the same directory add and evict objects) and the start-up verification."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.logger import Logger

from ..cache.scrub import Scrubber
from ..cache.store import CacheStore, verify_in_background
from ..upstream.credentials import RunInThread

CACHE_RESCAN_INTERVAL = 60.0


class CacheUpkeep(Service):
    """Other processes on the same directory add and evict objects: rescan every
    ``CACHE_RESCAN_INTERVAL``; with ``--cache-verify``, rehash large objects once at start;
    with a ``scrub_interval``, rehash every object once per interval, spread out over it."""

    log = Logger()

    def __init__(
        self,
        store: CacheStore,
        reactor: Any,
        thread_pool: RunInThread,
        *,
        verify: bool,
        scrub_interval: float = 0.0,
    ) -> None:
        self.store = store
        # Each slice of hashing runs in the thread pool: the reactor never waits on a disk.
        runner: Any = thread_pool
        self.scrubber = (
            Scrubber(store, reactor, interval=scrub_interval, runner=runner)
            if scrub_interval > 0
            else None
        )
        self.reactor = reactor
        self.thread_pool = thread_pool
        self.verify = verify
        self._timer = TimerService(CACHE_RESCAN_INTERVAL, self._rescan)
        self._timer.clock = reactor

    def startService(self) -> None:
        super().startService()
        self._timer.startService()
        if self.scrubber is not None:
            self.scrubber.start()
        if self.verify:
            self.reactor.callWhenRunning(self._verify)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        stopped: list[Deferred[Any]] = [self._timer.stopService()]
        if self.scrubber is not None:
            stopped.append(self.scrubber.stop())
        return DeferredList(stopped).addCallback(lambda _: None)

    def _rescan(self) -> None:
        self.store.rescan()

    def _verify(self) -> None:
        def done(corrupt: list[str]) -> None:
            self.log.info("cache verified: {count} corrupt objects discarded", count=len(corrupt))

        # The runner returns what the work returns (deferToThreadPool does).
        runner: Any = self.thread_pool
        ensureDeferred(verify_in_background(self.store, runner)).addCallback(done)
