"""Reading along a download that another process (a worker, a replica on a shared volume)
is writing into the same cache directory.

The writer holds the digest's download lock and publishes its temporary file, size and
headers (``progress.py``). A process that gets a request for the same digest opens that file
and serves its clients from it as it grows, instead of waiting for the commit or fetching the
object a second time. It learns of new bytes from inotify (a slow poll where there is none),
and the rule is the writer's: this process hashes what it reads from byte 0, and a reader's
last byte is released only once the file reached the announced size and the hash matched.

If the writer dies (its lock free, no object committed, the file short), the download is
taken over: ONE process takes the download lock (``Downloads.start``) and fetches the object
anew through the ``refetch`` handler one of its readers offered; every other process finds
the new writer's progress file and follows it. Readers keep their place: bytes they were
given came from the old file and were hashed from it, the rest come from the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .download import Download, DownloadFailed, DownloadReader, Downloads
from .metrics import CacheMetrics
from .objects import sha256_hex
from .progress import read_progress
from .store import CacheStore, DigestMismatch

READ_AHEAD = 1024 * 1024
"""Bytes read (and hashed) at once from the file being followed."""
READS_PER_TURN = 4
"""Reads per reactor turn, so one fast writer does not starve this process's other work."""

IDLE_GRACE = 1.0
"""Seconds a download followed here stays open with no reader (one that was waiting for the
announcement may attach a little later)."""

Refetch = Callable[[Download], object]
"""Given a download this process took over, send the upstream request and feed it (as after
``Downloads.start``: announce, ``DownloadProtocol``)."""


class WriterLost(DownloadFailed):
    """The writing process stopped before it announced the object, or died and nobody took
    over in time: a request that did not start reading fetches on its own."""


@attrs.frozen
class Announcement:
    """What the writer's upstream announced: the size (None: no Content-Length) and the
    headers to answer with (Content-Type)."""

    size: int | None
    headers: tuple[tuple[bytes, bytes], ...]


class FileNotifier(Protocol):
    """Tells of changes to a file; ``watch`` returns the function that stops watching."""

    def watch(self, path: str, changed: Callable[[], None]) -> Callable[[], None]: ...


class INotifier:
    """``FileNotifier`` by inotify (Linux), through Twisted's reader on the reactor."""

    def __init__(self, reactor: Any) -> None:
        from twisted.internet import inotify  # Linux only: imported where used
        from twisted.python.filepath import FilePath

        self._inotify = inotify.INotify(reactor)
        self._inotify.startReading()
        self._path = FilePath
        # Writes, the writer's close (commit or abort), unlink (link count) and rename.
        # Never IN_DELETE_SELF: Twisted's INotify closes itself, for every watch, on one.
        self._mask = (
            inotify.IN_MODIFY | inotify.IN_CLOSE_WRITE | inotify.IN_ATTRIB | inotify.IN_MOVE_SELF
        )

    def watch(self, path: str, changed: Callable[[], None]) -> Callable[[], None]:
        target = self._path(path.encode())
        try:
            self._inotify.watch(target, self._mask, callbacks=[lambda *_: changed()])
        except Exception:  # gone already, or out of watches: the polls cover it
            return lambda: None

        def stop() -> None:
            with contextlib.suppress(Exception):  # removed by the kernel with its file
                self._inotify.ignore(target)

        return stop


def inotify_notifier(reactor: Any) -> FileNotifier | None:
    """An inotify notifier, or None where there is none (then followers poll)."""
    try:
        return INotifier(reactor)
    except Exception:  # not Linux, no inotify, no instances left
        return None


@attrs.define(eq=False)
class _Source:
    """A file bytes are read from: responsible for offsets from ``start`` on (until the next
    source's start)."""

    fd: int
    path: str
    start: int


_WAITING, _READING, _LOST, _VERIFIED, _FAILED = "waiting", "reading", "lost", "verified", "failed"


class RemoteDownloads:
    """The downloads of other processes this process reads along, at most one per digest.

    ``notifier`` tells of file changes (``inotify_notifier(reactor)``; None: poll every
    ``poll_interval``); with one, the writer's liveness is still checked every
    ``check_interval``. A writer that died is replaced within ``lost_timeout`` seconds or its
    readers fail; this process takes over at most ``max_takeovers`` times per download.
    ``writer_active`` (tests) says whether a digest's download lock is held by anyone.
    """

    log = Logger()

    def __init__(
        self,
        store: CacheStore,
        downloads: Downloads,
        *,
        clock: IReactorTime,
        notifier: FileNotifier | None = None,
        poll_interval: float = 0.1,
        check_interval: float = 1.0,
        lost_timeout: float = 30.0,
        max_takeovers: int = 3,
        writer_active: Callable[[str], bool] | None = None,
        metrics: CacheMetrics | None = None,
    ) -> None:
        self.store = store
        self.downloads = downloads
        self.clock = clock
        self.notifier = notifier
        self.poll_interval = poll_interval
        self.check_interval = check_interval if notifier is not None else poll_interval
        self.lost_timeout = lost_timeout
        self.max_takeovers = max_takeovers
        self.writer_active = writer_active if writer_active is not None else store.writer_active
        self.metrics = metrics if metrics is not None else store.metrics
        self._active: dict[str, RemoteDownload] = {}

    def __len__(self) -> int:
        return len(self._active)

    def find(self, digest: str) -> RemoteDownload | None:
        """Another process's download of ``digest`` to read along, or None: none is running
        (start one), this process runs it (``Downloads.get``), or it is stored already.

        The result may not have been announced yet: wait for ``when_announced``, which
        fails with ``WriterLost`` if the writer stops first (then start over)."""
        existing = self._active.get(digest)
        if existing is not None and existing.joinable:
            return existing
        if self.downloads.get(digest) is not None or self.store.contains(digest):
            return None
        if not self.writer_active(digest):
            return None
        remote = RemoteDownload(self, digest)
        self._active[digest] = remote
        remote._begin()
        return remote

    def _over(self, remote: RemoteDownload) -> None:
        if self._active.get(remote.digest) is remote:
            del self._active[remote.digest]


class RemoteDownload:
    """One digest another process downloads, read along by this process's clients.

    Same reader contract as ``Download.attach``; ``when_announced`` gives the writer's
    ``Announcement`` (answer a client only after it).
    """

    log = Logger()

    def __init__(self, owner: RemoteDownloads, digest: str) -> None:
        self.digest = digest
        self._owner = owner
        self._hex = sha256_hex(digest)
        self._object_path = owner.store.object_path(self._hex)
        self.announcement: Announcement | None = None
        self.failure: Failure | None = None
        self.hashed = 0
        self.takeovers = 0
        self._state = _WAITING
        self._waiters: list[Deferred[Announcement]] = []
        self._readers: list[DownloadReader] = []
        self._refetch: dict[DownloadReader, Refetch] = {}
        self._sources: list[_Source] = []
        self._hash = hashlib.sha256()
        self._tail_offset = 0
        self._tail = b""
        self._timer: IDelayedCall | None = None
        self._soon: IDelayedCall | None = None
        self._unwatch: Callable[[], None] = lambda: None
        self._lost_at: float | None = None
        self._idle_since: float | None = None
        self._over = False

    # -- what the fetcher uses ---------------------------------------------------------------

    @property
    def size(self) -> int | None:
        if self._state == _VERIFIED:
            return self.hashed
        return None if self.announcement is None else self.announcement.size

    @property
    def verified(self) -> bool:
        return self._state == _VERIFIED

    @property
    def failed(self) -> bool:
        return self._state == _FAILED

    @property
    def readers(self) -> int:
        return len(self._readers)

    @property
    def joinable(self) -> bool:
        return not self._over and self._state != _FAILED

    def when_announced(self) -> Deferred[Announcement]:
        """Fires with the writer's announcement; fails with ``WriterLost`` if it stops
        before announcing (then this request fetches on its own, as if alone)."""
        if self.failure is not None:
            return fail(self.failure)
        if self.announcement is not None:
            return succeed(self.announcement)
        waiter: Deferred[Announcement] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def attach(
        self,
        consumer: IConsumer,
        first: int = 0,
        last: int | None = None,
        *,
        refetch: Refetch | None = None,
    ) -> DownloadReader:
        """A reader of bytes ``first``..``last``, as ``Download.attach``. ``refetch``: how
        this reader's request would fetch the object if the writer dies and this process
        takes over (its credentials); readers without one only follow."""
        if self._over or self.announcement is None:
            raise ValueError("not announced yet, or over: find it again")
        reader = DownloadReader(self, consumer, first, last, -1)
        self._readers.append(reader)
        if refetch is not None:
            self._refetch[reader] = refetch
        self._owner.metrics.count("remote_readers")
        reader._start()
        if self.failure is not None:
            reader._fail(self.failure)
        return reader

    # -- the reader contract (download.ReaderSource) -----------------------------------------

    _keeps_last_bytes = False  # every byte is on disk: readers never pin memory

    def _limit_for(self, end: int | None) -> int:
        if self._state == _VERIFIED:
            return self.hashed if end is None else min(end, self.hashed)
        if end is None:
            return self.hashed - 1
        return min(self.hashed, end - 1)

    def _read(self, fd: int, offset: int, length: int) -> bytes:
        tail_end = self._tail_offset + len(self._tail)
        if self._tail_offset <= offset < tail_end:
            start = offset - self._tail_offset
            return self._tail[start : start + length]
        # Each byte from the file it was hashed from.
        for index in range(len(self._sources) - 1, -1, -1):
            source = self._sources[index]
            if source.start <= offset:
                if index + 1 < len(self._sources):
                    length = min(length, self._sources[index + 1].start - offset)
                return os.pread(source.fd, length, offset)
        return b""

    def _detached(self, reader: DownloadReader) -> None:
        if reader in self._readers:
            self._readers.remove(reader)
        self._refetch.pop(reader, None)
        if not self._readers and self._state in (_VERIFIED, _FAILED):
            self._close()

    def _reader_moved(self, reader: DownloadReader) -> None:
        pass

    # -- following the file ------------------------------------------------------------------

    def _begin(self) -> None:
        self._soon = self._owner.clock.callLater(0, self._turn)
        self._schedule_check()

    def _schedule_check(self) -> None:
        interval = (
            self._owner.poll_interval if self._state == _WAITING else self._owner.check_interval
        )
        self._timer = self._owner.clock.callLater(interval, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._over:
            return
        if self._readers or self._waiters or self._state == _WAITING:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = self._owner.clock.seconds()
        elif self._owner.clock.seconds() - self._idle_since >= IDLE_GRACE:
            self._close()  # announced, and nobody came (or everybody left)
            return
        self._advance(check_writer=True)
        if not self._over:
            self._schedule_check()

    def _nudge(self) -> None:
        if self._soon is None and not self._over:
            self._soon = self._owner.clock.callLater(0, self._turn)

    def _turn(self) -> None:
        self._soon = None
        self._advance(check_writer=False)

    def _advance(self, *, check_writer: bool) -> None:
        try:
            if self._state == _WAITING:
                self._look_for_writer()
            if self._state in (_READING, _LOST):
                self._read_available()
                if self._complete():
                    self._verify()
                elif check_writer:
                    self._check_writer()
        except Exception:
            self.log.failure("following the download of {digest} failed", digest=self.digest)
            self._fail(Failure(DownloadFailed("following another process's download failed")))

    def _look_for_writer(self) -> None:
        progress = read_progress(self._object_path)
        if progress is not None:
            fd, path = self._open(progress.temp_path)
            if fd is not None:
                self._add_source(fd, path)
                self._state = _READING
                self.announcement = Announcement(progress.size, progress.headers)
                waiters, self._waiters = self._waiters, []
                for waiter in waiters:
                    waiter.callback(self.announcement)
                return
        if not self._owner.writer_active(self.digest):
            # Stopped before announcing (refused, failed) or already committed: either way
            # each request starts over on its own.
            self._fail(Failure(WriterLost(f"{self.digest}: the writer stopped")))

    def _open(self, temp_path: str) -> tuple[int | None, str]:
        """The writer's file, or the object if it was renamed into place meanwhile."""
        for path in (temp_path, self._object_path):
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC), path
            except FileNotFoundError:
                continue
        return None, temp_path

    def _add_source(self, fd: int, path: str) -> None:
        self._sources.append(_Source(fd, path, self.hashed))
        self._unwatch()
        notifier = self._owner.notifier
        self._unwatch = notifier.watch(path, self._nudge) if notifier else lambda: None

    def _read_available(self) -> None:
        source = self._sources[-1]
        size = self.size
        got = False
        for _ in range(READS_PER_TURN):
            want = READ_AHEAD if size is None else min(READ_AHEAD, size - self.hashed)
            if want <= 0:
                break
            data = os.pread(source.fd, want, self.hashed)
            if not data:
                break
            self._hash.update(data)
            self._tail_offset, self._tail = self.hashed, data
            self.hashed += len(data)
            got = True
        else:
            self._nudge()  # more may be there: go on next turn
        if got:
            for reader in list(self._readers):
                reader._pump()

    def _complete(self) -> bool:
        size = self.size
        if size is not None:
            return self.hashed >= size
        # No announced size: complete once the writer renamed the file we read into place
        # (it verified it) and we read all of it.
        source = self._sources[-1]
        try:
            mine, there = os.fstat(source.fd), os.stat(self._object_path)
        except FileNotFoundError:
            return False
        return (mine.st_ino, mine.st_dev) == (there.st_ino, there.st_dev) and (
            self.hashed >= mine.st_size
        )

    def _verify(self) -> None:
        if self._hash.hexdigest() != self._hex:
            self.log.warn(
                "{digest} read along from another process does not match its digest",
                digest=self.digest,
            )
            self._fail(Failure(DigestMismatch(self.digest)))
            return
        self._state = _VERIFIED
        self._unwatch()
        for reader in list(self._readers):
            reader._pump()
        if not self._readers:
            self._close()

    def _check_writer(self) -> None:
        current = self._sources[-1]
        active = self._owner.writer_active(self.digest)
        progress = read_progress(self._object_path)
        if active and progress is not None and progress.temp_path != current.path:
            # Another writer took over (elsewhere): follow its file from where we are.
            fd, path = self._open(progress.temp_path)
            if fd is not None and path != current.path:
                self._add_source(fd, path)
                self._state = _READING
                self._lost_at = None
                self._nudge()
            elif fd is not None:
                os.close(fd)
            return
        if active:
            return
        self._read_available()  # it may have finished just now
        if self._complete():
            self._verify()
            return
        if self._state == _READING:
            committed = self._open_committed(current)
            if committed is not None:
                self._add_source(committed, self._object_path)
                self._nudge()
                return
        self._writer_lost()

    def _open_committed(self, current: _Source) -> int | None:
        """The committed object, when it is not the file being read already."""
        try:
            fd = os.open(self._object_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        mine, there = os.fstat(current.fd), os.fstat(fd)
        if (mine.st_ino, mine.st_dev) == (there.st_ino, there.st_dev):
            os.close(fd)
            return None
        return fd

    def _writer_lost(self) -> None:
        owner = self._owner
        now = owner.clock.seconds()
        if self._state != _LOST:
            self._state = _LOST
            self._lost_at = now
            self.log.warn(
                "the process downloading {digest} stopped at {hashed} bytes; taking over",
                digest=self.digest,
                hashed=self.hashed,
            )
        assert self._lost_at is not None
        if now - self._lost_at > owner.lost_timeout or self.takeovers >= owner.max_takeovers:
            self._fail(Failure(WriterLost(f"{self.digest}: the writer died, nobody took over")))
            return
        refetch = next(iter(self._refetch.values()), None)
        if refetch is None:
            return  # nobody here can fetch it: wait for another process to take over
        download = owner.downloads.start(self.digest)
        if download is None:
            return  # another process took the lock first (or it is stored): follow it
        self.takeovers += 1
        owner.metrics.count("takeovers")
        fd = os.open(download.temp_path, os.O_RDONLY | os.O_CLOEXEC)
        self._add_source(fd, download.temp_path)
        self._state = _READING
        self._lost_at = None
        try:
            refetch(download)
        except Exception:
            self.log.failure("taking over {digest} failed", digest=self.digest)
            download.fail(Failure())

    def _fail(self, failure: Failure) -> None:
        if self._state == _FAILED:
            return
        self._state = _FAILED
        self.failure = failure
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(failure)
        for reader in list(self._readers):
            reader._fail(failure)
        self._close()

    def _close(self) -> None:
        if self._over:
            return
        self._over = True
        self._unwatch()
        for call in (self._timer, self._soon):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._soon = None
        for source in self._sources:
            os.close(source.fd)
        self._sources = []
        self._owner._over(self)
