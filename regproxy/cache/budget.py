"""How many bytes downloads nobody reads any more may still fetch, across the whole process.

A client that asks for a blob and leaves at once still leaves a download behind: finishing it
is usually cheap (the cache keeps the object), but a client doing this for many digests would
make the proxy download without bound. Each orphaned download takes what it may still fetch
from one shared budget; when the budget is spent, a download whose last reader leaves stops
instead. A download that gets a reader back, or ends, gives its share back.
"""

from __future__ import annotations

DEFAULT_ORPHAN_BUDGET = 1024 * 1024 * 1024


class OrphanBudget:
    """Bytes in flight for downloads with no reader left, at most ``limit_bytes`` in total."""

    def __init__(self, limit_bytes: int = DEFAULT_ORPHAN_BUDGET) -> None:
        if limit_bytes < 0:
            raise ValueError("the orphan budget cannot be negative")
        self.limit_bytes = limit_bytes
        self._taken: dict[object, int] = {}
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    def holds(self, holder: object) -> int:
        """What ``holder`` has taken so far."""
        return self._taken.get(holder, 0)

    def take(self, holder: object, amount: int) -> bool:
        """Take ``amount`` more for ``holder``; False (and nothing taken) past the limit."""
        if amount < 0:
            raise ValueError("cannot take a negative amount")
        if self._used + amount > self.limit_bytes:
            return False
        self._taken[holder] = self._taken.get(holder, 0) + amount
        self._used += amount
        return True

    def release(self, holder: object) -> None:
        """Give back everything ``holder`` took (a reader came back, or it ended)."""
        self._used -= self._taken.pop(holder, 0)
