"""What the cache counts, as a small interface, so the cache never imports prometheus.

The wiring code adapts these calls to its own metrics (labelling them per route where it knows
the route); tests record them.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal, Protocol

CounterName = Literal[
    "hits",
    "misses",
    "coalesced_readers",
    "bytes_from_cache",
    "bytes_zero_copy",
    "bytes_from_upstream",
    "digest_mismatches",
    "corrupt_objects",
    "evictions",
    "evicted_bytes",
    "store_write_errors",
    "orphans_stopped",
    "remote_readers",
    "takeovers",
    "verified_objects",
    "scrubbed_objects",
    "scrubbed_bytes",
]
GaugeName = Literal["size_bytes", "objects"]


class CacheMetrics(Protocol):
    def count(self, name: CounterName, amount: int = 1) -> None:
        """Add ``amount`` to a counter."""

    def gauge(self, name: GaugeName, value: int) -> None:
        """Set a gauge to ``value``."""


class NullMetrics:
    """Counts nothing: the default when nobody asked."""

    def count(self, name: CounterName, amount: int = 1) -> None:
        pass

    def gauge(self, name: GaugeName, value: int) -> None:
        pass


class RecordingMetrics:
    """Remembers every count and the last value of every gauge (tests, and a quick look)."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, int] = {}

    def count(self, name: CounterName, amount: int = 1) -> None:
        self.counters[name] += amount

    def gauge(self, name: GaugeName, value: int) -> None:
        self.gauges[name] = value
