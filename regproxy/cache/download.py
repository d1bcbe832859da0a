"""One download in progress per digest per process, read by any number of clients at once.

The writer (the upstream body) pushes bytes in with ``write``/``finish``/``fail``: into the
store's temporary file and the running sha256. Readers (``reader.DownloadReader``) attach at
any time, for all or a range, are told of new bytes by the writer (never by polling), and
each goes at its own pace: a slow client pauses only itself.

Verified bytes: a reader is never handed the last byte of what it asked for before the whole
object's digest has been checked. When the digest does not match, nothing is committed and
every reader is failed while it still lacks at least one byte, so no client ever holds a
complete-looking wrong body (its caller aborts the connection). A ranged reader whose range
ends early therefore waits for the whole object to be verified before its last byte.

A store that cannot write (ENOSPC, EIO...) never fails a pull the upstream serves: the
download drops its file and goes on for the readers it has. They read what reached the file
from it (the descriptor stays readable after the unlink) and what came after from memory, in
lockstep: the upstream is paused while any reader that still needs bytes is paused, so no
more than about one chunk is held. The digest is still checked and last bytes still held
back. Such a download takes no new readers (``Downloads.get`` no longer returns it).

Other processes on the same directory read along from the temporary file (``tail.py``): the
writer publishes where it is and what the upstream announced (``progress.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from .budget import OrphanBudget
from .faults import report_write_failure
from .metrics import CacheMetrics, NullMetrics
from .progress import publish, withdraw
from .reader import (
    READ_CHUNK,
    Abandoned,
    DownloadFailed,
    DownloadReader,
    ReaderSource,
    ReaderStopped,
    WrongLength,
)
from .store import CacheStore, DigestMismatch, PendingObject, StoredObject, TooLarge

DEFAULT_ORPHAN_LIMIT = 256 * 1024 * 1024


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
    (it is already paid for), within what ``orphan_budget`` (shared by every download of the
    process) has left. ``run_blocking`` runs the fsync (default: right here; the
    service passes a thread pool runner so a large fsync never stalls the reactor).
    ``done`` fires with True when the object was committed to the store and False when it was
    not (the download failed -- then ``failure`` says why -- or the object was too large to
    keep, or the store could not write it); it never fails, so nobody has to listen to it.

    The upstream body's transport is reached through ``stop_upstream``, ``pause_upstream``
    and ``resume_upstream`` (``DownloadProtocol`` sets them).
    """

    log = Logger()

    def __init__(
        self,
        pending: PendingObject,
        *,
        clock: IReactorTime,
        expected_size: int | None = None,
        orphan_limit: int = DEFAULT_ORPHAN_LIMIT,
        orphan_budget: OrphanBudget | None = None,
        metrics: CacheMetrics | None = None,
        run_blocking: Runner = _run_here,
        on_over: Callable[[Download], None] | None = None,
        on_unstored: Callable[[Download], None] | None = None,
    ) -> None:
        self.digest = pending.digest
        self.expected_size = expected_size
        self.announced = expected_size is not None
        self._announce_waiters: list[Deferred[int | None]] = []
        self.received = 0
        self.done: Deferred[bool] = Deferred()
        self.failure: Failure | None = None
        self.stop_upstream: Callable[[], None] | None = None
        self.pause_upstream: Callable[[], None] | None = None
        self.resume_upstream: Callable[[], None] | None = None
        self.upstream_paused = False
        self._pending = pending
        self._clock = clock
        self._orphan_limit = orphan_limit
        self._budget = orphan_budget if orphan_budget is not None else OrphanBudget()
        self._metrics: CacheMetrics = metrics if metrics is not None else NullMetrics()
        self._run_blocking = run_blocking
        self._on_over = on_over
        self._on_unstored = on_unstored
        self._state = _WRITING
        self._readers: list[DownloadReader] = []
        self._attached_ever = 0
        self._orphaned_at: int | None = None
        self._committed: StoredObject | None = None
        self._over = False
        self.temp_path = pending.temp_path
        # Our own descriptor: readers dup it, and it outlives the pending object's.
        self._fd = os.dup(pending.fd)
        # Whether the bytes still go to the store; once not, ``_hash`` takes over the
        # pending object's running sha256 and ``_file_end`` says how far the file goes.
        self.stored = True
        self._hash: Any = None
        self._file_end = 0
        # Bytes kept in memory from ``_mem_offset``: while stored, the last chunk written
        # (readers keeping up are fed from it, not the file); after the store failed, every
        # byte past the file that some reader still needs.
        self._mem_offset = 0
        self._mem: bytes | bytearray = b""

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

    @property
    def buffered(self) -> int:
        """Bytes held in memory (after a store failure: what some reader still needs)."""
        return len(self._mem)

    @property
    def joinable(self) -> bool:
        """Whether a new reader may attach (not once the store failed: nothing is kept for
        a latecomer to catch up from)."""
        return self.stored and not self._over

    # Writer side (what an IProtocol's dataReceived/connectionLost call).

    def announce(self, size: int | None, headers: Sequence[tuple[bytes, bytes]] = ()) -> bool:
        """The upstream's response headers arrived, with this Content-Length (None: none).

        Callers answering clients wait for this (``when_announced``) to send their own
        headers. ``headers`` are those other processes reading along should answer with
        (Content-Type): they are published with the size for them (``progress.py``).
        Returns whether the object will be kept: one larger than the whole cache is
        still streamed to its readers but never counted against the cache nor committed.
        """
        if self.announced:
            raise ValueError("announced twice")
        self.announced = True
        self.expected_size = size
        kept = size is None or size <= self._pending.store.max_size
        if self.stored:
            if not kept:
                self._pending.exclude_from_accounting()
            try:
                publish(self._pending.final_path, self._pending.temp_path, size, headers)
            except OSError as error:
                # Other processes will not find it and fetch on their own: costly, not wrong.
                report_write_failure(self._pending.store, error, "announce a download")
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
        if self.stored:
            try:
                self._pending.write(data)
            except OSError as error:
                self._lose_store(error, "write")
                if self._state != _WRITING:
                    return
        if self.stored:
            self._mem_offset, self._mem = self.received, data
            self._file_end = self.received + len(data)
        else:
            if not self._mem:
                self._mem = bytearray()
                self._mem_offset = self.received
            assert isinstance(self._mem, bytearray)
            self._mem += data
            self._hash.update(data)
        self.received += len(data)
        self._metrics.count("bytes_from_upstream", len(data))
        if self._orphaned_at is not None and not self._orphan_may_fetch(len(data)):
            self._abandon()
            return
        for reader in list(self._readers):
            reader._pump()
        self._settle()

    def _orphan_may_fetch(self, amount: int) -> bool:
        assert self._orphaned_at is not None
        if self.received - self._orphaned_at > self._orphan_limit:
            return False
        # A known size took its whole remainder from the budget when orphaned.
        return self.expected_size is not None or self._budget.take(self, amount)

    def _lose_store(self, error: BaseException, what: str) -> None:
        """The store failed under us: drop the file, go on from memory for our readers."""
        report_write_failure(self._pending.store, error, what)
        self.stored = False
        self._hash = self._pending.running_hash()
        self._file_end = self.received
        self._mem, self._mem_offset = b"", self.received
        self._budget.release(self)
        self._drop_pending()
        if self._on_unstored is not None:
            self._on_unstored(self)
        if not self._readers:
            self._abandon()

    def _drop_pending(self) -> None:
        withdraw(self._pending.final_path)
        try:
            self._pending.abort()
        except OSError:
            self.log.failure("dropping the temporary file of {digest} failed", digest=self.digest)

    def finish(self) -> None:
        """The upstream body ended: verify, hand readers their last bytes, commit."""
        if self._state != _WRITING:
            return
        self._budget.release(self)
        if self.expected_size is not None and self.received != self.expected_size:
            self.fail(
                Failure(WrongLength(f"{self.received} of {self.expected_size} bytes arrived"))
            )
            return
        if not self.stored:
            self._finish_unstored()
            return
        if not self._pending.verified():
            withdraw(self._pending.final_path)
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

    def _finish_unstored(self) -> None:
        if self._hash.hexdigest() != self.digest.partition(":")[2]:
            self._metrics.count("digest_mismatches")
            self.log.warn(
                "digest mismatch for {digest} (streamed without the store)", digest=self.digest
            )
            self._fail_readers(Failure(DigestMismatch(self.digest)))
            return
        self._state = _VERIFIED
        for reader in list(self._readers):
            reader._pump()
        self._settle()
        self.done.callback(False)
        self._maybe_over()

    def fail(self, reason: Failure | BaseException) -> None:
        """The upstream broke off: nothing is kept, readers still reading are failed."""
        if self._state != _WRITING:
            return
        failure = reason if isinstance(reason, Failure) else Failure(reason)
        if not failure.check(DownloadFailed, DigestMismatch):
            failure = Failure(DownloadFailed(f"upstream transfer failed: {failure.value!r}"))
        self._budget.release(self)
        if self.stored:
            self._drop_pending()
        self._fail_readers(failure)

    def _fail_readers(self, failure: Failure) -> None:
        self._state = _FAILED
        self.failure = failure
        self._mem = b""
        waiters, self._announce_waiters = self._announce_waiters, []
        for waiter in waiters:
            waiter.errback(failure)
        for reader in list(self._readers):
            reader._fail(failure)
        self.done.callback(False)
        self._maybe_over()

    def _commit(self) -> None:
        withdraw(self._pending.final_path)
        try:
            self._committed = self._pending.commit()
        except TooLarge:
            self.log.info(
                "{digest} is larger than the whole cache: served, not kept", digest=self.digest
            )
            self.done.callback(False)
        except Exception as error:
            report_write_failure(self._pending.store, error, "commit")
            self._drop_pending()
            self.done.callback(False)
        else:
            self.done.callback(True)
        self._maybe_over()

    def _commit_failed(self, failure: Failure) -> None:
        report_write_failure(self._pending.store, failure.value or OSError(), "sync")
        withdraw(self._pending.final_path)
        self._drop_pending()
        self.done.callback(False)
        self._maybe_over()

    def _abandon(self) -> None:
        self.log.info(
            "no reader left for {digest}: stopping at {received} bytes",
            digest=self.digest,
            received=self.received,
        )
        self._metrics.count("orphans_stopped")
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
        if not self.stored:
            raise ValueError("this download lost its file: fetch on your own")
        reader = DownloadReader(self, consumer, first, last, os.dup(self._fd))
        if self._attached_ever:
            self._metrics.count("coalesced_readers")
        self._attached_ever += 1
        self._readers.append(reader)
        self._orphaned_at = None
        self._budget.release(self)
        reader._start()
        if self._state == _FAILED:
            assert self.failure is not None
            reader._fail(self.failure)
        return reader

    def _detached(self, reader: DownloadReader) -> None:
        if reader in self._readers:
            self._readers.remove(reader)
        if self._readers:
            self._settle()
            return
        if self._state == _WRITING:
            left = None if self.expected_size is None else self.expected_size - self.received
            if not self.stored:
                self._abandon()  # nothing is kept: nobody left to stream to
            elif left is not None and (
                left > self._orphan_limit or not self._budget.take(self, left)
            ):
                self._abandon()
            else:
                self._orphaned_at = self.received
        self._maybe_over()

    def _reader_moved(self, reader: DownloadReader) -> None:
        self._settle()

    def _settle(self) -> None:
        """Without the store: drop from memory what no reader needs, and hold the upstream
        while a reader that still needs bytes is paused (lockstep, bounded memory)."""
        if self.stored:
            return
        needing = [r for r in self._readers if r._needs_bytes()]
        keep_from = min([r.position for r in needing] + [self.received])
        if keep_from > self._mem_offset and self._mem:
            assert isinstance(self._mem, bytearray)
            drop = min(keep_from - self._mem_offset, len(self._mem))
            del self._mem[:drop]
            self._mem_offset += drop
        if not self._mem:
            self._mem_offset = self.received
        if self._state != _WRITING:
            return
        hold = any(r._paused for r in needing)
        if hold and not self.upstream_paused:
            self.upstream_paused = True
            if self.pause_upstream is not None:
                self.pause_upstream()
        elif not hold and self.upstream_paused:
            self.upstream_paused = False
            if self.resume_upstream is not None:
                self.resume_upstream()

    def _maybe_over(self) -> None:
        if self._over or self._readers or self._state == _WRITING:
            return
        if self._state == _VERIFIED and not self.done.called:
            return  # still committing
        self._over = True
        self._budget.release(self)
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

    @property
    def _keeps_last_bytes(self) -> bool:
        """Whether readers waiting for the verdict should keep their held-back bytes
        themselves (without the store, memory must not keep them for one reader)."""
        return not self.stored

    def _read(self, fd: int, offset: int, length: int) -> bytes:
        mem_end = self._mem_offset + len(self._mem)
        if self._mem_offset <= offset < mem_end:
            start = offset - self._mem_offset
            return bytes(self._mem[start : start + length])
        if offset < self._file_end:
            return os.pread(fd, min(length, self._file_end - offset), offset)
        return b""


class DownloadProtocol(Protocol):
    """Feeds an upstream response body (``response.deliverBody``) into a Download."""

    def __init__(self, download: Download) -> None:
        self.download = download

    def connectionMade(self) -> None:
        transport: Any = self.transport
        # stopProducing closes an HTTP client body transfer cleanly (see relay.py).
        self.download.stop_upstream = transport.stopProducing
        self.download.pause_upstream = transport.pauseProducing
        self.download.resume_upstream = transport.resumeProducing
        if self.download.upstream_paused:
            transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.download.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.download.stop_upstream = None
        self.download.pause_upstream = self.download.resume_upstream = None
        if reason.check(ResponseDone, PotentialDataLoss):
            # A body without a length ends with the connection: the digest says if it is whole.
            self.download.finish()
        else:
            self.download.fail(reason)


class Downloads:
    """The downloads in progress in this process: at most one per digest.

    ``orphan_budget`` is shared by all of them (and may be shared wider): what downloads
    whose readers all left may still fetch, in total.
    """

    def __init__(
        self,
        store: CacheStore,
        *,
        clock: IReactorTime,
        orphan_limit: int = DEFAULT_ORPHAN_LIMIT,
        orphan_budget: OrphanBudget | None = None,
        metrics: CacheMetrics | None = None,
        run_blocking: Runner = _run_here,
    ) -> None:
        self.store = store
        self._clock = clock
        self._orphan_limit = orphan_limit
        self.orphan_budget = orphan_budget if orphan_budget is not None else OrphanBudget()
        self._metrics = metrics if metrics is not None else store.metrics
        self._run_blocking = run_blocking
        self._active: dict[str, Download] = {}

    def __len__(self) -> int:
        return len(self._active)

    def get(self, digest: str) -> Download | None:
        """The download of ``digest`` to attach to: never one that lost its file or failed
        (its waiters hear of it before it is over; one that retries starts afresh)."""
        download = self._active.get(digest)
        return None if download is None or download.failed else download

    def start(self, digest: str, expected_size: int | None = None) -> Download | None:
        """A new download of ``digest``, or None when this process may not write it: another
        process is downloading it (``tail.RemoteDownloads.find``), it is stored already
        (``store.open_object``), it is larger than the whole cache, or the store cannot
        create its file (counted and logged): then pass it through.

        Call it before sending the upstream request, then ``announce`` the size when the
        headers arrive (unless given here)."""
        running = self._active.get(digest)
        if running is not None and not running.failed:
            raise ValueError(f"{digest} is already being downloaded here; attach to it")
        if expected_size is not None and expected_size > self.store.max_size:
            return None
        try:
            pending = self.store.begin_write(digest)
        except OSError as error:
            report_write_failure(self.store, error, "start a download")
            return None
        if pending is None:
            return None
        # A progress file left by a writer that died before us names its temporary file,
        # not ours: readers elsewhere must not follow it.
        withdraw(pending.final_path)
        download = Download(
            pending,
            clock=self._clock,
            expected_size=expected_size,
            orphan_limit=self._orphan_limit,
            orphan_budget=self.orphan_budget,
            metrics=self._metrics,
            run_blocking=self._run_blocking,
            on_over=self._over,
            on_unstored=self._over,
        )
        self._active[digest] = download
        return download

    def _over(self, download: Download) -> None:
        if self._active.get(download.digest) is download:
            del self._active[download.digest]


__all__ = [
    "READ_CHUNK",
    "Abandoned",
    "Download",
    "DownloadFailed",
    "DownloadProtocol",
    "DownloadReader",
    "Downloads",
    "ReaderSource",
    "ReaderStopped",
    "WrongLength",
]
