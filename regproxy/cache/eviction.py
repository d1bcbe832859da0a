"""Keeping the store under its bound: least recently *served* first, by the process that
writes, never an object with readers. Readers in this process are counted in their entry;
readers in other processes hold a shared lock on the digest's lock file, which an evictor
must replace with an exclusive one. Also the removal of objects found corrupt, which does not
wait for readers (nothing can make their bytes right).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.logger import Logger

from .catalog import Catalog
from .layout import Layout
from .locks import ProcessLocks
from .metrics import CacheMetrics


class Evictor:
    log = Logger()

    def __init__(
        self,
        catalog: Catalog,
        layout: Layout,
        locks: ProcessLocks,
        metrics: CacheMetrics,
        clock: Callable[[], float],
        *,
        max_size: int,
        slack: float,
    ) -> None:
        self.max_size = max_size
        self._catalog = catalog
        self._layout = layout
        self._locks = locks
        self._metrics = metrics
        self._clock = clock
        self._slack = slack
        self._warned_at = float("-inf")

    def over(self) -> bool:
        return self._catalog.size + self._catalog.pending > self.max_size

    def enforce_bound(self, keep: str | None = None) -> int:
        """Evict least recently served objects until ``slack`` below the bound (hysteresis,
        so a full cache is not swept once per write); returns bytes freed."""
        catalog = self._catalog
        if not self.over():
            return 0
        target = int(self.max_size * (1 - self._slack))
        freed = 0
        for hex_, entry in sorted(catalog.entries.items(), key=lambda item: item[1].last_served):
            if catalog.size + catalog.pending <= target:
                break
            if hex_ == keep or entry.readers > 0:
                continue
            if self.evict(hex_):
                freed += entry.size
        now = self._clock()
        if self.over() and now - self._warned_at > 60:
            self._warned_at = now
            self.log.warn(
                "cache over its bound: {size} bytes (+{pending} downloading) > {bound}; "
                "the rest is being read",
                size=catalog.size,
                pending=catalog.pending,
                bound=self.max_size,
            )
        return freed

    def evict(self, hex_: str) -> bool:
        try:
            lock = self._locks.exclusive(hex_)
        except OSError:
            return False  # the lock directory is unusable: evict nothing rather than blindly
        if lock is None:
            return False  # read or written by someone, here or in another process
        try:
            entry = self._catalog.entries.get(hex_)
            try:
                os.unlink(self._layout.object_path(hex_))
            except FileNotFoundError:
                pass  # another process evicted it first
            except OSError:
                return False  # a read-only or failing volume: keep counting it
            else:
                self._metrics.count("evictions")
                if entry is not None:
                    self._metrics.count("evicted_bytes", entry.size)
            self._catalog.forget(hex_)
        finally:
            lock.release()
        self._catalog.publish()
        return True

    def discard(self, hex_: str, ino: int | None = None) -> bool:
        """Remove a corrupt object at once, even while it is being read: readers that have it
        open keep their descriptor, and nobody new gets it. Only the file found corrupt
        (``ino``) goes, never a good copy another process has put in place since."""
        self._metrics.count("corrupt_objects")
        path = self._layout.object_path(hex_)
        removed = False
        try:
            if ino is None or os.stat(path).st_ino == ino:
                os.unlink(path)
                removed = True
        except FileNotFoundError:
            pass
        except OSError as error:
            # Cannot remove it (read-only volume): at least this process never serves it.
            self.log.warn("cannot remove corrupt object {hex}: {error}", hex=hex_, error=error)
        entry = self._catalog.entries.get(hex_)
        if entry is not None and (ino is None or entry.ino == ino):
            self._catalog.forget(hex_)
        self._catalog.publish()
        return removed
