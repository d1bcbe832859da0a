"""Content-addressed objects on disk: ``blobs/sha256/ab/abcd...``, one file per digest.

This module is the store's face: ``CacheStore`` wires the parts, each a module of its own --
``layout`` (paths), ``catalog`` (what this process knows of the objects), ``reading``
(opens and trust checks), ``writing`` (verified commits), ``eviction`` (the size bound),
``upkeep`` (start-up, rescans, full verification), ``faults`` (an unwritable volume) -- and
the names callers use are importable from here.

Each process keeps its own catalog, rebuilt at start-up from directory listings and ``stat``
alone; objects other processes commit are adopted when first looked up or at the next
``rescan``. The index of repositories and tags lives beside the objects (``index.py``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from twisted.logger import Logger

from . import upkeep
from .catalog import Catalog, Entry
from .eviction import Evictor
from .faults import StoreUnwritable, WriteFailures
from .index import CacheIndex
from .layout import Layout
from .locks import ProcessLocks
from .metrics import CacheMetrics, NullMetrics
from .objects import sha256_hex
from .reading import ObjectReader, StoredObject
from .upkeep import StartReport, verify_in_background
from .writing import DigestMismatch, ObjectWriter, PendingObject, TooLarge

__all__ = [
    "SMALL_OBJECT_SIZE",
    "CacheStore",
    "DigestMismatch",
    "PendingObject",
    "StartReport",
    "StoreUnwritable",
    "StoredObject",
    "TooLarge",
    "open_store",
    "verify_in_background",
]

SMALL_OBJECT_SIZE = 64 * 1024
"""Objects up to this size (manifests, configs) are read whole and rehashed at every read."""


class CacheStore:
    """The objects under ``root`` and the index beside them.

    ``max_size`` bounds the bytes of committed objects plus downloads in progress in this
    process; when a write or a commit crosses it, the least recently served objects without
    readers are evicted until the total is ``eviction_slack`` below it.

    A volume that cannot be written never makes a call here raise ``OSError`` at a request:
    lookups answer "not stored", index writes are dropped, and writes raise the one
    ``StoreUnwritable`` (see ``begin_write``). Failures are counted (``store_write_errors``)
    and logged once per streak.
    """

    log = Logger()

    def __init__(
        self,
        root: str,
        *,
        max_size: int,
        clock: Callable[[], float] = time.time,
        metrics: CacheMetrics | None = None,
        small_object_size: int = SMALL_OBJECT_SIZE,
        eviction_slack: float = 0.05,
        atime_resolution: float = 60.0,
        fsync: bool = True,
    ) -> None:
        self.root = root
        self.metrics: CacheMetrics = metrics if metrics is not None else NullMetrics()
        self.small_object_size = small_object_size
        self.fsync = fsync
        self.layout = Layout(root)
        os.makedirs(self.layout.blobs_dir, exist_ok=True)
        self.write_failures = WriteFailures(self.metrics)
        self._locks = ProcessLocks(self.layout.locks_dir)
        self.catalog = Catalog(self.metrics, clock)
        self.evictor = Evictor(
            self.catalog,
            self.layout,
            self._locks,
            self.metrics,
            clock,
            max_size=max_size,
            slack=eviction_slack,
        )
        self._reader = ObjectReader(
            self.catalog,
            self.layout,
            self._locks,
            self.evictor,
            self.metrics,
            clock,
            failures=self.write_failures,
            small_object_size=small_object_size,
            atime_resolution=atime_resolution,
        )
        self._writer = ObjectWriter(self)
        self.index = CacheIndex(self.layout.index_dir, clock=clock, failures=self.write_failures)
        self._clock = clock

    # Paths and figures.

    @property
    def max_size(self) -> int:
        return self.evictor.max_size

    @property
    def blobs_dir(self) -> str:
        return self.layout.blobs_dir

    @property
    def _entries(self) -> dict[str, Entry]:
        return self.catalog.entries

    def object_path(self, hex_: str) -> str:
        return self.layout.object_path(hex_)

    @property
    def size(self) -> int:
        """Bytes of committed objects this process knows of."""
        return self.catalog.size

    @property
    def pending_size(self) -> int:
        """Bytes written so far by this process's downloads in progress."""
        return self.catalog.pending

    @property
    def objects(self) -> int:
        return len(self.catalog.entries)

    # Start-up and rescans.

    def start(self) -> StartReport:
        """Clean what crashed writers left and learn what is on disk (stat only)."""
        return upkeep.start(self)

    def rescan(self) -> int:
        """Adopt new objects, forget vanished ones, refresh last served times other
        processes recorded. Returns the temporary files of dead writers removed."""
        return upkeep.rescan(self)

    # Lookups.

    def contains(self, digest: str) -> bool:
        """Whether a committed object is on disk (by this process or another)."""
        return self._reader.contains(digest)

    def open_object(self, digest: str) -> StoredObject | None:
        """The committed object, checked and held open, or None (a miss; also on any read
        error). Large objects this process has not hashed yet come with ``verified`` False:
        serve them with ``serve.serve_object``, which verifies as it sends."""
        return self._reader.open_object(digest)

    # Writing.

    def begin_write(self, digest: str) -> PendingObject | None:
        """Start writing ``digest``, or None when it is not ours to write: another download
        of it is running (in this process or another), it is being evicted, or it is already
        stored (``open_object`` it).

        Raises ``StoreUnwritable`` (an ``OSError``; never any other) when the volume cannot
        take the object: full, read-only, failing, or its directories deleted. The caller
        then serves the object without storing it; nothing was left behind, the failure is
        counted and logged once per streak, and the next ``begin_write`` simply tries again
        (so writing resumes by itself when space returns).
        """
        return self._writer.begin_write(digest)

    def writer_active(self, digest: str) -> bool:
        """Whether some process (this one included) holds the digest's download lock.

        Used by a process waiting for another one's download: when the lock is free and the
        object still absent, that download failed and it is this process's turn.
        """
        return self._writer.writer_active(digest)

    def _pending_grew(self, amount: int) -> None:
        self.catalog.pending += amount
        if amount > 0 and self.evictor.over():
            self.evictor.enforce_bound()

    def _committed(self, pending: PendingObject, stat: os.stat_result) -> Entry:
        # Hashed whole as it was written: verified from the start.
        entry = self.catalog.adopt(pending.hex, stat, verified=True)
        entry.last_served = self._clock()
        self.evictor.enforce_bound(keep=pending.hex)
        self.catalog.publish()
        return entry

    # Eviction and corruption.

    def enforce_bound(self, keep: str | None = None) -> int:
        """Evict least recently served objects until under the bound; returns bytes freed."""
        return self.evictor.enforce_bound(keep)

    def _evict(self, hex_: str) -> bool:
        return self.evictor.evict(hex_)

    def discard(self, digest: str) -> bool:
        """Remove an object found to be corrupt; True if it was there."""
        return self.evictor.discard(sha256_hex(digest))

    def verified(self, digest: str) -> bool:
        """Whether this process has hashed the stored object whole since adopting it."""
        entry = self.catalog.entries.get(sha256_hex(digest))
        return entry is not None and entry.verified

    # Verification of large objects.

    def verify_object(self, digest: str) -> bool:
        """Rehash one stored object; True if intact or gone. Only reads: safe in a thread."""
        return upkeep.verify_object(self, digest)

    def digests(self, min_size: int = 0) -> list[str]:
        """The digests of the objects this process knows of, of at least ``min_size`` bytes."""
        return ["sha256:" + h for h, e in self.catalog.entries.items() if e.size >= min_size]

    def verify(self, min_size: int | None = None) -> list[str]:
        """Rehash every object of at least ``min_size`` bytes (default: the large ones) and
        discard the corrupt; returns their digests. Blocking: see ``verify_in_background``
        and ``scrub.Scrubber`` for the reactor's sake."""
        return upkeep.verify(self, min_size)


def open_store(
    root: str,
    *,
    max_size: int,
    clock: Callable[[], float] = time.time,
    metrics: CacheMetrics | None = None,
    small_object_size: int = SMALL_OBJECT_SIZE,
    eviction_slack: float = 0.05,
    atime_resolution: float = 60.0,
    fsync: bool = True,
) -> CacheStore:
    """A started store (clean-up and index rebuild done): ``CacheStore(...)`` + ``start()``."""
    store = CacheStore(
        root,
        max_size=max_size,
        clock=clock,
        metrics=metrics,
        small_object_size=small_object_size,
        eviction_slack=eviction_slack,
        atime_resolution=atime_resolution,
        fsync=fsync,
    )
    store.start()
    return store
