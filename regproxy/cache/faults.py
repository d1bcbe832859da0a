"""A cache volume that cannot be written (full, read-only, failing, its directory deleted)
must never fail a request: what would have been stored is not, and the caller goes on without
it. This module names that outcome and reports it without flooding the log.
"""

from __future__ import annotations

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
    """Counts every failed write (``store_write_errors``) and logs once per failure streak
    and kind ("objects", "index"): a full disk under load would otherwise log on every
    request. The first success of the same kind ends the streak (and says so once).
    """

    log = Logger()

    def __init__(self, metrics: CacheMetrics) -> None:
        self._metrics = metrics
        self._failing: set[str] = set()

    def failing(self, kind: str) -> bool:
        return kind in self._failing

    def failed(self, kind: str, what: str, error: BaseException) -> None:
        self._metrics.count("store_write_errors")
        if kind in self._failing:
            return
        self._failing.add(kind)
        self.log.warn(
            "cache {kind} cannot be written ({what}: {error}); serving without storing "
            "until writes work again",
            kind=kind,
            what=what,
            error=error,
        )

    def succeeded(self, kind: str) -> None:
        if kind in self._failing:
            self._failing.discard(kind)
            self.log.info("cache {kind} can be written again", kind=kind)
