"""The background scrub: every stored object is re-hashed once per ``interval`` (default a
day, ``--cache-scrub-interval``), so bytes that rot on disk after they were verified -- or
that nobody has served since a restart -- are found and removed before a client needs them.

Spread out: a pass hashes one object at a time, ``interval / objects`` apart, so a large
cache costs a steady trickle of reads, not a daily storm. Low priority: the hashing runs in
``runner`` (the service's thread pool) one ``slice_size`` slice per job, so it never holds
the reactor nor a pool thread for long, and other work queued on the pool (fsyncs) gets in
between slices. (A thread cannot be given its own ``nice`` value portably; small slices and
the spacing are what keep it in the background.)

The scrub is a reader like any other: it holds the digest's shared lock and counts as a
reader while it hashes, so no evictor (here or in another process) removes the file under
it, and it skips objects held exclusively (being evicted). A mismatch removes that very file
(by inode, never a good copy put in place since) and counts it in ``corrupt_objects``; a
match marks the object verified for this process (sendfile from then on).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from functools import partial

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .layout import HASH_CHUNK, hash_slice
from .store import CacheStore

DEFAULT_INTERVAL = 86400.0

SliceRunner = Callable[[Callable[[], int]], "Deferred[int]"]


def _run_here(work: Callable[[], int]) -> Deferred[int]:
    return maybeDeferred(work)


class Scrubber:
    log = Logger()

    def __init__(
        self,
        store: CacheStore,
        clock: IReactorTime,
        *,
        interval: float = DEFAULT_INTERVAL,
        runner: SliceRunner = _run_here,
        slice_size: int = HASH_CHUNK,
    ) -> None:
        if interval <= 0:
            raise ValueError("the scrub interval must be positive")
        self.store = store
        self.interval = interval
        self._clock = clock
        self._runner = runner
        self._slice_size = slice_size
        self._queue: list[str] = []
        self._gap = interval
        self._call: IDelayedCall | None = None
        self._running: Deferred[object] | None = None
        self._stopped = True
        self.passes = 0

    def start(self) -> None:
        """Begin the first pass, one gap from now (never a burst at start-up)."""
        if not self._stopped:
            return
        self._stopped = False
        self._new_pass()
        self._schedule(self._gap)

    def stop(self) -> Deferred[None]:
        """Stop scrubbing; fires once an object being hashed has let go of its file."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        running = self._running
        if running is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        running.addBoth(lambda _: done.callback(None))
        return done

    def _new_pass(self) -> None:
        # Largest last: popped from the end, so a pass starts with what costs least.
        entries = self.store.catalog.entries
        self._queue = sorted(entries, key=lambda hex_: entries[hex_].size, reverse=True)
        self._gap = self.interval / max(1, len(self._queue))
        self.passes += 1

    def _schedule(self, delay: float) -> None:
        if not self._stopped:
            self._call = self._clock.callLater(delay, self._next)

    def _next(self) -> None:
        self._call = None
        if not self._queue:
            self._new_pass()
            if not self._queue:
                self._schedule(self.interval)
                return
        hex_ = self._queue.pop()
        running: Deferred[object] = Deferred.fromCoroutine(self.scrub_one(hex_))
        running.addErrback(
            lambda failure: self.log.failure("scrubbing {hex} failed", failure, hex=hex_)
        )
        self._running = running

        def over(_: object) -> None:
            self._running = None
            self._schedule(self._gap)

        running.addBoth(over)

    async def scrub_one(self, hex_: str) -> bool | None:
        """Re-hash one object: True intact, False corrupt (removed), None skipped (gone,
        busy, unreadable, or the scrub was stopped)."""
        store = self.store
        entry = store.catalog.entries.get(hex_)
        if entry is None:
            return None
        try:
            lock = store._locks.shared(hex_)
        except OSError:
            return None
        if lock is None:
            return None  # being evicted or replaced: next pass
        entry.readers += 1
        fd = -1
        try:
            try:
                fd = os.open(store.object_path(hex_), os.O_RDONLY | os.O_CLOEXEC)
                ino = os.fstat(fd).st_ino
            except OSError:
                return None
            hasher = hashlib.sha256()
            offset = 0
            while True:
                try:
                    read = await self._runner(
                        partial(hash_slice, fd, hasher, offset, self._slice_size)
                    )
                except OSError as error:
                    self.log.warn("cannot scrub {hex}: {error}", hex=hex_, error=error)
                    return None
                if self._stopped:
                    return None
                if read == 0:
                    break
                offset += read
            store.metrics.count("scrubbed_objects")
            store.metrics.count("scrubbed_bytes", offset)
            if hasher.hexdigest() == hex_:
                store.catalog.mark_verified(hex_, ino)
                return True
            self.log.warn("scrub: cached object {hex} is corrupt; removing it", hex=hex_)
            store.evictor.discard(hex_, ino)
            return False
        finally:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            entry.readers -= 1
            lock.release()
