"""What one process knows of the committed objects: size, identity, last served, readers,
and whether it has hashed them itself. Rebuilt from ``stat`` at start-up (no reads), so the
figures here are bookkeeping, not proof: ``verified`` is the only claim about the bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import attrs

from .metrics import CacheMetrics


@attrs.define(eq=False)
class Entry:
    size: int
    mtime_ns: int
    ino: int
    last_served: float
    readers: int = 0
    atime_written: float = 0.0
    # Hashed whole by this process since it adopted this file (committed by it, served
    # whole, or scrubbed): only then may it be sent without hashing (sendfile).
    verified: bool = False


class Catalog:
    """The entries by hex digest and the byte accounting the size bound is checked against."""

    def __init__(self, metrics: CacheMetrics, clock: Callable[[], float]) -> None:
        self.entries: dict[str, Entry] = {}
        self.size = 0
        self.pending = 0
        self._metrics = metrics
        self._clock = clock

    def adopt(self, hex_: str, stat: os.stat_result, *, verified: bool = False) -> Entry:
        """A file at the final path is (now) this one: start over with what ``stat`` says."""
        old = self.entries.get(hex_)
        if old is not None:
            self.size -= old.size
        entry = Entry(
            size=stat.st_size,
            mtime_ns=stat.st_mtime_ns,
            ino=stat.st_ino,
            last_served=max(stat.st_atime, stat.st_mtime),
            verified=verified,
        )
        self.entries[hex_] = entry
        self.size += entry.size
        return entry

    def set_size(self, entry: Entry, size: int) -> None:
        self.size += size - entry.size
        entry.size = size

    def forget(self, hex_: str) -> None:
        entry = self.entries.pop(hex_, None)
        if entry is not None:
            self.size -= entry.size

    def mark_verified(self, hex_: str, ino: int) -> bool:
        """The file with inode ``ino`` hashed to its digest; True if it is still the entry's."""
        entry = self.entries.get(hex_)
        if entry is None or entry.ino != ino:
            return False
        if not entry.verified:
            entry.verified = True
            self._metrics.count("verified_objects")
        return True

    def publish(self) -> None:
        self._metrics.gauge("size_bytes", self.size)
        self._metrics.gauge("objects", len(self.entries))
