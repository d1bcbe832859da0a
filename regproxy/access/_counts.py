"""Counters of requests per key and window, the one job every rate-limit store shares.

The window is fixed and aligned to its own length, each key with its own phase (see
``Slot.of``). Why fixed windows and not a sliding log or GCRA: the state is one integer per key,
which every store increments atomically in one step (``INCR`` in Redis, one ``UPSERT`` in
SQLite, a dict here), so the limit is exact across workers and replicas with nothing else
shared; the window's boundaries follow from the clock and the key alone, so every process
agrees on them without talking; and the headers mean exactly what they say: ``Remaining`` is
what is left until the window ends, ``Retry-After`` is when the next request will be admitted.
The price: a client may spend one window's quota at its very end and the next one's at the
start of the next, twice the count in a short time, never more than the count in a window.
For a quota that protects an upstream's allowance over hours, that is the right trade.
Why a phase per key: with every window aligned to the epoch, every refused client would
come back in the same second when the windows turn over.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred, succeed

# Keys longer than this, or with characters that are awkward in a Redis key or a log line,
# are replaced by their SHA-256: a client's address or a principal's name can be long.
MAX_KEY_LENGTH = 128
HASHED = "#"
# Keys counted in one process at most: beyond, the least recently used goes (and its count).
MAX_MEMORY_KEYS = 65536


def bounded_key(key: str) -> str:
    """``key`` itself when short and plain, else ``#`` and its SHA-256: never longer than 128.

    Kept keys never start with ``#``, so two keys share a counter only by a SHA-256 collision.
    """
    if (
        len(key) <= MAX_KEY_LENGTH
        and key.isascii()
        and key.isprintable()
        and " " not in key
        and not key.startswith(HASHED)
    ):
        return key
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return HASHED + digest


@attrs.frozen
class Slot:
    """One key's counter in one window: what a store increments. Times in milliseconds since
    the epoch (integers, so every process computes the same boundaries)."""

    key: str
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def name(self) -> str:
        """A name for the counter, unique per key, window length and window."""
        return f"{self.length}:{self.start}:{self.key}"

    @classmethod
    def of(cls, key: str, window: float, now: float) -> Slot:
        """The window of ``window`` seconds that holds ``now`` for ``key`` (any string)."""
        key = bounded_key(key)
        length = max(1, round(window * 1000))
        phase = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % length
        at = int(now * 1000)
        return cls(key, (at - phase) // length * length + phase, length)


class Counts(Protocol):
    """A store of counters: one request more in ``slot``, answering the count so far."""

    def increment(self, slot: Slot, now: float) -> Deferred[int]: ...

    def close(self) -> Deferred[None]: ...


class MemoryCounts:
    """Counters in this process, bounded: the least recently used key goes when full."""

    def __init__(self, capacity: int = MAX_MEMORY_KEYS) -> None:
        self.capacity = capacity
        # (key, window length) -> (window start, count), in order of last use.
        self._counts: collections.OrderedDict[tuple[str, int], tuple[int, int]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._counts)

    def increment(self, slot: Slot, now: float) -> Deferred[int]:
        counts, key = self._counts, (slot.key, slot.length)
        current = counts.pop(key, None)
        if current is None or current[0] != slot.start:
            count = 1
            self._make_room(now)
        else:
            count = current[1] + 1
        counts[key] = (slot.start, count)
        return succeed(count)

    def _make_room(self, now: float) -> None:
        at = now * 1000
        counts = self._counts
        # The least recently used come first: drop those whose window is over, then, when
        # still full, the least recently used even if its window runs on.
        while counts:
            (_, length), (start, _) = next(iter(counts.items()))
            if start + length > at and len(counts) < self.capacity:
                break
            counts.popitem(last=False)

    def close(self) -> Deferred[None]:
        return succeed(None)
