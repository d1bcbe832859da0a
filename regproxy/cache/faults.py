"""A cache volume that cannot be written (full, read-only, failing, its directory deleted)
must never fail a request: what would have been stored is not, and the caller goes on without
it. This module names that outcome and reports it without flooding the log.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from .metrics import CacheMetrics


class StoreUnwritable(OSError):
    """The store could not write (ENOSPC, EROFS, EIO, EDQUOT, a vanished directory...).

    The one exception the store lets out of a write (``CacheStore.begin_write``,
    ``PendingObject.write``, ``PendingObject.sync``, ``PendingObject.commit``); by then
    nothing is half-visible: the temporary file is removed and the download lock released.
    Callers serve the bytes without keeping them (stream from the upstream, verified). It is
    an ``OSError`` so code that already treats any I/O error as "not stored" keeps working.
    """

    def __init__(self, what: str, cause: OSError) -> None:
        super().__init__(cause.errno, f"cache store cannot write ({what}): {cause.strerror}")
        self.what = what
        self.cause = cause


class WriteFailures:
    """Counts every failed write (``store_write_errors``) and logs once per failure streak:
    a full disk under load would otherwise log on every request.

    A streak is per ``kind`` ("objects", "index") and ``what`` failed ("tag record",
    "write"...), and only a success of the same operation ends it: on a full volume an empty
    file can still be created while a record with bytes in it cannot, and that alternation
    must not log on every request either. ``succeeded(kind)`` without ``what`` ends every
    streak of the kind (a committed object proves creating, writing and renaming work).
    """

    log = Logger()

    def __init__(self, metrics: CacheMetrics) -> None:
        self._metrics = metrics
        self._failing: set[tuple[str, str]] = set()

    def failing(self, kind: str) -> bool:
        return any(k == kind for k, _ in self._failing)

    def failed(self, kind: str, what: str, error: BaseException) -> None:
        self._metrics.count("store_write_errors")
        if (kind, what) in self._failing:
            return
        self._failing.add((kind, what))
        self.log.warn(
            "cache {kind} cannot be written ({what}: {error}); serving without storing "
            "until writes work again",
            kind=kind,
            what=what,
            error=error,
        )

    def succeeded(self, kind: str, what: str | None = None) -> None:
        if not self._failing:
            return
        ended = {k for k in self._failing if k[0] == kind and what in (None, k[1])}
        if ended:
            self._failing -= ended
            self.log.info(
                "cache {kind} can be written again ({what})",
                kind=kind,
                what=", ".join(sorted(w for _, w in ended)),
            )


def report_write_failure(store: Any, error: BaseException, what: str) -> None:
    """A failed write of a download, counted and logged once per streak with the store's
    own (which has already reported its ``StoreUnwritable`` failures itself)."""
    if not isinstance(error, StoreUnwritable):
        store.write_failures.failed("objects", what, error)
