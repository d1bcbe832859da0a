"""A shared store of counts with a local one to fall back on: a broken store never fails or
holds up a request, and its outage shows in the log once, its recovery once."""

from __future__ import annotations

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._counts import Counts, Slot


class FallbackCounts:
    """Counts in ``primary``; when it fails, in ``fallback`` until it works again.

    The primary must fail fast while it is known to be down (Redis: not connected; SQLite:
    just failed), so that falling back costs no time per request.
    """

    log = Logger()

    def __init__(self, primary: Counts, fallback: Counts, *, what: str, instead: str) -> None:
        self.primary = primary
        self.fallback = fallback
        self.what = what
        self.instead = instead
        self.down = False

    def increment(self, slot: Slot, now: float) -> Deferred[int]:
        counted = self.primary.increment(slot, now)
        return counted.addCallbacks(self._worked, self._failed, errbackArgs=(slot, now))

    def _worked(self, count: int) -> int:
        if self.down:
            self.down = False
            self.log.info("rate limits: {what} works again; counting there", what=self.what)
        return count

    def _failed(self, reason: Failure, slot: Slot, now: float) -> Deferred[int]:
        if not self.down:
            self.down = True
            self.log.warn(
                "rate limits: {what} failed ({error}); counting {instead} until it is back",
                what=self.what,
                error=describe(reason),
                instead=self.instead,
            )
        return self.fallback.increment(slot, now)

    def close(self) -> Deferred[None]:
        closed = gatherResults([self.primary.close(), self.fallback.close()])
        return closed.addCallback(lambda _: None)


def describe(reason: Failure) -> str:
    """The error in a few words for a log line (the exception's type and text)."""
    text = str(reason.value)
    name = type(reason.value).__name__
    return f"{name}: {text}" if text else name
