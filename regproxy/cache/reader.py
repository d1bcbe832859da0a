"""One client reading a download in progress (``DownloadReader``): its own position, its own
pace, its last byte held back until the object is verified; and what it reads from
(``ReaderSource``: a download of this process, or one another process writes)."""

from __future__ import annotations

import os
from typing import Any
from typing import Protocol as Interface

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

READ_CHUNK = 64 * 1024


class DownloadFailed(Exception):
    """The download did not complete: the upstream broke off, or nobody wanted it any more."""


class Abandoned(DownloadFailed):
    """The last reader left and what remained was more than the download may fetch alone."""


class WrongLength(DownloadFailed):
    """The upstream sent a different number of bytes than it announced."""


class ReaderStopped(Exception):
    """The reader's consumer went away (the client disconnected) before the end."""


class ReaderSource(Interface):
    """What a ``DownloadReader`` reads from: a download here (``Download``) or one another
    process writes (``tail.RemoteDownload``)."""

    digest: str
    log: Logger

    @property
    def size(self) -> int | None: ...

    @property
    def verified(self) -> bool: ...

    def _limit_for(self, end: int | None) -> int: ...

    def _read(self, fd: int, offset: int, length: int) -> bytes: ...

    def _detached(self, reader: DownloadReader) -> None: ...

    def _reader_moved(self, reader: DownloadReader) -> None: ...

    @property
    def _keeps_last_bytes(self) -> bool: ...


@implementer(IPushProducer)
class DownloadReader:
    """One client reading a download: its own position, its own pace.

    ``fd`` is the reader's own descriptor of the download's file (closed when it is done),
    or -1 when its source reads for it (``tail.RemoteDownload``).
    """

    def __init__(
        self, download: ReaderSource, consumer: IConsumer, first: int, last: int | None, fd: int
    ) -> None:
        if first < 0 or (last is not None and last < first):
            raise ValueError(f"bad range {first}-{last}")
        self.download = download
        self.consumer = consumer
        self.position = first
        self.sent = 0
        self.done: Deferred[int] = Deferred()
        self._last = last
        self._fd = fd
        self._paused = False
        self._pumping = False
        self._finished = False
        # The last byte of a range, once arrived, waiting for the verdict (kept here when the
        # source asks it to, so it does not have to keep every byte after it).
        self._held: bytes | None = None

    @property
    def paused(self) -> bool:
        return self._paused

    def _end(self) -> int | None:
        size = self.download.size
        if self._last is None:
            return size
        return self._last + 1 if size is None else min(self._last + 1, size)

    def _needs_bytes(self) -> bool:
        """Whether the source must still keep bytes from ``position`` for this reader."""
        if self._finished or self._held is not None:
            return False
        end = self._end()
        return end is None or self.position < end

    def _start(self) -> None:
        self.consumer.registerProducer(self, True)
        self._pump()

    def _pump(self) -> None:
        if self._pumping or self._finished:
            return
        self._pumping = True
        try:
            self._deliver()
        except Exception:
            # This reader's consumer or file broke: fail this reader alone, never the
            # writer (whose dataReceived we may be inside) nor the other readers.
            self.download.log.failure("a reader of {digest} failed", digest=self.download.digest)
            self._fail(Failure())
        finally:
            self._pumping = False
        if not self._finished:
            self.download._reader_moved(self)

    def _deliver(self) -> None:
        download = self.download
        while not self._paused and not self._finished:
            end = self._end()
            limit = download._limit_for(end)
            if self.position >= limit:
                break
            if self._held is not None and end is not None and self.position == end - 1:
                data = self._held
            else:
                data = download._read(
                    self._fd, self.position, min(READ_CHUNK, limit - self.position)
                )
            if not data:
                # The file is shorter than the writer said: never happens unless the
                # temporary file was truncated under us; treat like a failed download.
                self._fail(Failure(DownloadFailed("the download's file ended early")))
                return
            self.position += len(data)
            self.sent += len(data)
            self.consumer.write(data)
        end = self._end()
        if self._finished or end is None:
            return
        if download.verified and self.position >= end:
            # Complete even if paused: the last bytes are with the consumer already.
            self._complete()
        elif (
            self._held is None
            and self.position == end - 1
            and download._limit_for(None) + 1 >= end
            and download._keeps_last_bytes
        ):
            self._held = download._read(self._fd, self.position, 1)

    def _complete(self) -> None:
        self._close()
        self.done.callback(self.sent)

    def _fail(self, failure: Failure) -> None:
        if self._finished:
            return
        self._close()
        self.done.errback(failure)

    def _close(self) -> None:
        self._finished = True
        self._unregister()
        self._close_fd()
        self.download._detached(self)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _unregister(self) -> None:
        # A twisted.web Request whose client is gone has no channel to unregister from.
        consumer: Any = self.consumer
        if getattr(consumer, "channel", True) is not None:
            consumer.unregisterProducer()

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True
        if not self._pumping:
            self.download._reader_moved(self)

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        """The client went away: leave the download (which goes on for the others)."""
        if self._finished:
            return
        self._finished = True
        self._close_fd()
        self.download._detached(self)
        self.done.errback(Failure(ReaderStopped()))
