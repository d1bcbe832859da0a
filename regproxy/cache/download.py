"""One download in progress per digest per process, read by any number of clients at once.

The writer (the upstream body) pushes bytes in with ``write``/``finish``/``fail``; they go to
the store's temporary file and into the running sha256. Readers attach at any time, from byte
0 or for a range, and are told of new bytes by the writer (never by polling the disk). Each
reader is its own push producer on its own consumer, so a slow client pauses only itself: it
falls behind and catches up by reading the file at its own pace, while the writer and the other
readers go on.

Verified bytes: a reader is never handed the last byte of what it asked for before the whole
object's digest has been checked. When the digest does not match, nothing is committed and
every reader is failed while it still lacks at least one byte, so no client ever holds a
complete-looking wrong body (its caller aborts the connection). A ranged reader whose range
ends early therefore waits for the whole object to be verified before its last byte.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from .metrics import CacheMetrics, NullMetrics
from .store import CacheStore, DigestMismatch, PendingObject, StoredObject, TooLarge

READ_CHUNK = 64 * 1024
DEFAULT_ORPHAN_LIMIT = 256 * 1024 * 1024


class DownloadFailed(Exception):
    """The download did not complete: the upstream broke off, or nobody wanted it any more."""


class Abandoned(DownloadFailed):
    """The last reader left and what remained was more than the download may fetch alone."""


class WrongLength(DownloadFailed):
    """The upstream sent a different number of bytes than it announced."""


class ReaderStopped(Exception):
    """The reader's consumer went away (the client disconnected) before the end."""


_WRITING, _VERIFIED, _FAILED = "writing", "verified", "failed"

Runner = Callable[[Callable[[], None]], "Deferred[None]"]


def _run_here(work: Callable[[], None]) -> Deferred[None]:
    return maybeDeferred(work)


class Download:
    """The shared state of one digest being fetched.

    ``expected_size`` is the upstream's Content-Length when it sent one (given here, or later
    with ``announce`` once the upstream's headers arrive: the lock is taken, and the download
    shared, before the upstream request goes out); it lets ranged readers be answered before
    the end and lets an abandoned download judge what is left.
    ``orphan_limit`` bytes is how much more the download may fetch once no reader is left
    (it is already paid for). ``run_blocking`` runs the fsync (default: right here; the
    service passes a thread pool runner so a large fsync never stalls the reactor).
    ``done`` fires with True when the object was committed to the store and False when it was
    not (the download failed -- then ``failure`` says why -- or the object was too large to
    keep); it never fails, so nobody has to listen to it.
    """

    log = Logger()

    def __init__(
        self,
        pending: PendingObject,
        *,
        clock: IReactorTime,
        expected_size: int | None = None,
        orphan_limit: int = DEFAULT_ORPHAN_LIMIT,
        metrics: CacheMetrics | None = None,
        run_blocking: Runner = _run_here,
        on_over: Callable[[Download], None] | None = None,
    ) -> None:
        self.digest = pending.digest
        self.expected_size = expected_size
        self.announced = expected_size is not None
        self._announce_waiters: list[Deferred[int | None]] = []
        self.received = 0
        self.done: Deferred[bool] = Deferred()
        self.failure: Failure | None = None
        self.stop_upstream: Callable[[], None] | None = None
        self._pending = pending
        self._clock = clock
        self._orphan_limit = orphan_limit
        self._metrics: CacheMetrics = metrics if metrics is not None else NullMetrics()
        self._run_blocking = run_blocking
        self._on_over = on_over
        self._state = _WRITING
        self._readers: list[DownloadReader] = []
        self._attached_ever = 0
        self._orphaned_at: int | None = None
        self._committed: StoredObject | None = None
        self._over = False
        # Our own descriptor: readers dup it, and it outlives the pending object's.
        self._fd = os.dup(pending.fd)
        # The last chunk written, so readers keeping up are fed from memory, not the file.
        self._tail_offset = 0
        self._tail = b""

    @property
    def readers(self) -> int:
        return len(self._readers)

    @property
    def verified(self) -> bool:
        return self._state == _VERIFIED

    @property
    def failed(self) -> bool:
        return self._state == _FAILED

    @property
    def size(self) -> int | None:
        """The object's size when known: announced by the upstream, or once verified."""
        if self._state == _VERIFIED:
            return self.received
        return self.expected_size

    # Writer side (what an IProtocol's dataReceived/connectionLost call).

    def announce(self, size: int | None) -> bool:
        """The upstream's response headers arrived, with this Content-Length (None: none).

        Callers answering clients wait for this (``when_announced``) to send their own
        headers. Returns whether the object will be kept: one larger than the whole cache is
        still streamed to its readers but never counted against the cache nor committed.
        """
        if self.announced:
            raise ValueError("announced twice")
        self.announced = True
        self.expected_size = size
        kept = size is None or size <= self._pending.store.max_size
        if not kept:
            self._pending.exclude_from_accounting()
        waiters, self._announce_waiters = self._announce_waiters, []
        for waiter in waiters:
            waiter.callback(size)
        return kept

    def when_announced(self) -> Deferred[int | None]:
        """Fires with the announced size (at once if known); fails if the download failed."""
        if self._state == _FAILED:
            assert self.failure is not None
            return fail(self.failure)
        if self.announced:
            return succeed(self.expected_size)
        waiter: Deferred[int | None] = Deferred()
        self._announce_waiters.append(waiter)
        return waiter

    def write(self, data: bytes) -> None:
        if self._state != _WRITING or not data:
            return
        if self.expected_size is not None and self.received + len(data) > self.expected_size:
            self.fail(Failure(WrongLength(f"more than the {self.expected_size} bytes announced")))
            return
        try:
            self._pending.write(data)
        except OSError as error:
            self.fail(Failure(error))
            return
        self._tail_offset = self.received
        self._tail = data
        self.received += len(data)
        self._metrics.count("bytes_from_upstream", len(data))
        if (
            self._orphaned_at is not None
            and self.received - self._orphaned_at > self._orphan_limit
        ):
            self._abandon()
            return
        for reader in list(self._readers):
            reader._pump()

    def finish(self) -> None:
        """The upstream body ended: verify, hand readers their last bytes, commit."""
        if self._state != _WRITING:
            return
        if self.expected_size is not None and self.received != self.expected_size:
            self.fail(
                Failure(WrongLength(f"{self.received} of {self.expected_size} bytes arrived"))
            )
            return
        if not self._pending.verified():
            with contextlib.suppress(DigestMismatch):
                self._pending.commit()  # verifies again, logs, counts, removes the file
            self._fail_readers(Failure(DigestMismatch(self.digest)))
            return
        self._state = _VERIFIED
        for reader in list(self._readers):
            reader._pump()
        pending = self._pending
        synced = self._run_blocking(pending.sync) if self._pending.store.fsync else None
        if synced is None:
            self._commit()
        else:
            synced.addCallbacks(lambda _: self._commit(), self._commit_failed)

    def fail(self, reason: Failure | BaseException) -> None:
        """The upstream broke off: nothing is kept, readers still reading are failed."""
        if self._state != _WRITING:
            return
        failure = reason if isinstance(reason, Failure) else Failure(reason)
        if not failure.check(DownloadFailed, DigestMismatch):
            failure = Failure(DownloadFailed(f"upstream transfer failed: {failure.value!r}"))
        self._pending.abort()
        self._fail_readers(failure)

    def _fail_readers(self, failure: Failure) -> None:
        self._state = _FAILED
        self.failure = failure
        waiters, self._announce_waiters = self._announce_waiters, []
        for waiter in waiters:
            waiter.errback(failure)
        for reader in list(self._readers):
            reader._fail(failure)
        self.done.callback(False)
        self._maybe_over()

    def _commit(self) -> None:
        try:
            self._committed = self._pending.commit()
        except TooLarge:
            self.log.info(
                "{digest} is larger than the whole cache: served, not kept", digest=self.digest
            )
            self.done.callback(False)
        except Exception:
            self.log.failure("committing {digest} failed", digest=self.digest)
            self._pending.abort()
            self.done.callback(False)
        else:
            self.done.callback(True)
        self._maybe_over()

    def _commit_failed(self, failure: Failure) -> None:
        self.log.failure("syncing {digest} failed", failure, digest=self.digest)
        self._pending.abort()
        self.done.callback(False)
        self._maybe_over()

    def _abandon(self) -> None:
        self.log.info(
            "no reader left for {digest}: stopping at {received} bytes",
            digest=self.digest,
            received=self.received,
        )
        stop, self.stop_upstream = self.stop_upstream, None
        self.fail(Failure(Abandoned(f"{self.digest}: no reader left")))
        if stop is not None:
            stop()

    # Reader side.

    def attach(
        self, consumer: IConsumer, first: int = 0, last: int | None = None
    ) -> DownloadReader:
        """A reader of bytes ``first``..``last`` (inclusive; None: to the end) that writes to
        ``consumer`` as they arrive. It registers itself as the consumer's streaming
        producer; ``reader.done`` fires with the bytes written (then the caller finishes the
        response) or fails (then the caller aborts the connection)."""
        if self._over:
            raise ValueError("this download is over; open the stored object instead")
        reader = DownloadReader(self, consumer, first, last, os.dup(self._fd))
        if self._attached_ever:
            self._metrics.count("coalesced_readers")
        self._attached_ever += 1
        self._readers.append(reader)
        self._orphaned_at = None
        reader._start()
        if self._state == _FAILED:
            assert self.failure is not None
            reader._fail(self.failure)
        return reader

    def _detached(self, reader: DownloadReader) -> None:
        if reader in self._readers:
            self._readers.remove(reader)
        if self._readers:
            return
        if self._state == _WRITING:
            left = None if self.expected_size is None else self.expected_size - self.received
            if left is not None and left > self._orphan_limit:
                self._abandon()
            else:
                self._orphaned_at = self.received
        self._maybe_over()

    def _maybe_over(self) -> None:
        if self._over or self._readers or self._state == _WRITING:
            return
        if self._state == _VERIFIED and not self.done.called:
            return  # still committing
        self._over = True
        os.close(self._fd)
        if self._committed is not None:
            self._committed.close()
            self._committed = None
        if self._on_over is not None:
            self._on_over(self)

    def _limit_for(self, end: int | None) -> int:
        """How far a reader whose answer ends at ``end`` (exclusive) may be given bytes."""
        if self._state == _VERIFIED:
            return self.received if end is None else min(end, self.received)
        if end is None:
            return self.received - 1
        return min(self.received, end - 1)

    def _read(self, fd: int, offset: int, length: int) -> bytes:
        tail_end = self._tail_offset + len(self._tail)
        if self._tail_offset <= offset and offset + length <= tail_end:
            start = offset - self._tail_offset
            return self._tail[start : start + length]
        return os.pread(fd, length, offset)


@implementer(IPushProducer)
class DownloadReader:
    """One client reading a download: its own position, its own pace."""

    def __init__(
        self, download: Download, consumer: IConsumer, first: int, last: int | None, fd: int
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

    def _end(self) -> int | None:
        size = self.download.size
        if self._last is None:
            return size
        return self._last + 1 if size is None else min(self._last + 1, size)

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

    def _deliver(self) -> None:
        download = self.download
        while not self._paused and not self._finished:
            limit = download._limit_for(self._end())
            if self.position >= limit:
                break
            data = download._read(self._fd, self.position, min(READ_CHUNK, limit - self.position))
            if not data:
                # The file is shorter than the writer said: never happens unless the
                # temporary file was truncated under us; treat like a failed download.
                self._fail(Failure(DownloadFailed("the download's file ended early")))
                return
            self.position += len(data)
            self.sent += len(data)
            self.consumer.write(data)
        end = self._end()
        if not self._finished and download.verified and end is not None and self.position >= end:
            # Complete even if paused: the last bytes are with the consumer already.
            self._complete()

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
        os.close(self._fd)
        self.download._detached(self)

    def _unregister(self) -> None:
        # A twisted.web Request whose client is gone has no channel to unregister from.
        consumer: Any = self.consumer
        if getattr(consumer, "channel", True) is not None:
            consumer.unregisterProducer()

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        """The client went away: leave the download (which goes on for the others)."""
        if self._finished:
            return
        self._finished = True
        os.close(self._fd)
        self.download._detached(self)
        self.done.errback(Failure(ReaderStopped()))


class DownloadProtocol(Protocol):
    """Feeds an upstream response body (``response.deliverBody``) into a Download."""

    def __init__(self, download: Download) -> None:
        self.download = download

    def connectionMade(self) -> None:
        transport: Any = self.transport
        # stopProducing closes an HTTP client body transfer cleanly (see relay.py).
        self.download.stop_upstream = transport.stopProducing

    def dataReceived(self, data: bytes) -> None:
        self.download.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.download.stop_upstream = None
        if reason.check(ResponseDone, PotentialDataLoss):
            # A body without a length ends with the connection: the digest says if it is whole.
            self.download.finish()
        else:
            self.download.fail(reason)


class Downloads:
    """The downloads in progress in this process: at most one per digest."""

    def __init__(
        self,
        store: CacheStore,
        *,
        clock: IReactorTime,
        orphan_limit: int = DEFAULT_ORPHAN_LIMIT,
        metrics: CacheMetrics | None = None,
        run_blocking: Runner = _run_here,
    ) -> None:
        self.store = store
        self._clock = clock
        self._orphan_limit = orphan_limit
        self._metrics = metrics if metrics is not None else store.metrics
        self._run_blocking = run_blocking
        self._active: dict[str, Download] = {}

    def __len__(self) -> int:
        return len(self._active)

    def get(self, digest: str) -> Download | None:
        """The download of ``digest`` this process is running (or whose readers are still
        reading), to attach to."""
        return self._active.get(digest)

    def start(self, digest: str, expected_size: int | None = None) -> Download | None:
        """A new download of ``digest``, or None when this process may not write it: another
        process is downloading it (``wait_for_commit``), it is stored already
        (``store.open_object``), or it is larger than the whole cache (pass it through).

        Call it before sending the upstream request, then ``announce`` the size when the
        headers arrive (unless given here)."""
        if digest in self._active:
            raise ValueError(f"{digest} is already being downloaded here; attach to it")
        if expected_size is not None and expected_size > self.store.max_size:
            return None
        pending = self.store.begin_write(digest)
        if pending is None:
            return None
        download = Download(
            pending,
            clock=self._clock,
            expected_size=expected_size,
            orphan_limit=self._orphan_limit,
            metrics=self._metrics,
            run_blocking=self._run_blocking,
            on_over=self._over,
        )
        self._active[digest] = download
        return download

    def _over(self, download: Download) -> None:
        if self._active.get(download.digest) is download:
            del self._active[download.digest]


def wait_for_commit(
    store: CacheStore,
    digest: str,
    clock: IReactorTime,
    *,
    timeout: float,
    interval: float = 0.05,
) -> Deferred[StoredObject | None]:
    """Wait for another process's download of ``digest`` to be committed.

    Fires with the stored object, or None when that download stopped without committing (its
    lock is free, nothing stored: this process may start its own) or ``timeout`` passed.
    Polling, because a lock held by another process announces nothing; cancelling stops it.
    """
    deadline = clock.seconds() + timeout
    calls: list[IDelayedCall] = []  # the one pending check, for cancellation
    result: Deferred[StoredObject | None] = Deferred(lambda d: calls[0].cancel())

    def check() -> None:
        if store.contains(digest):
            obj = store.open_object(digest)
            if obj is not None:
                result.callback(obj)
                return
        if not store.writer_active(digest) and not store.contains(digest):
            result.callback(None)
            return
        if clock.seconds() >= deadline:
            result.callback(None)
            return
        calls[0] = clock.callLater(interval, check)

    calls.append(clock.callLater(0, check))
    return result
