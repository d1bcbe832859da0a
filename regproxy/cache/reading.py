"""Opening committed objects for reading, and the trust rules applied before any byte goes out.

A file at a final path was renamed there by a verifier (this process's or another's), so it
is the right object as long as it is that file: its inode, size and modification time are
checked at every open. Small objects (manifests, configs) are read whole and rehashed at
every open. A large object is trusted on those checks only once this process has hashed it
whole (``StoredObject.verified``); until then the server hashes what it sends and holds the
last bytes back until the digest matched (see ``serve.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable

from twisted.logger import Logger

from .catalog import Catalog, Entry
from .eviction import Evictor
from .faults import WriteFailures
from .layout import HASH_CHUNK, Layout, read_all
from .locks import HeldLock, ProcessLocks
from .metrics import CacheMetrics
from .objects import sha256_hex

_CONDEMNED_LIMIT = 10_000


class StoredObject:
    """An open, committed object; ``close`` it when done (or use ``with``).

    Small objects come as ``data`` (read and verified in one go, nothing held open, ``fd`` is
    -1). Large ones as an open descriptor ``fd``: read them with ``read`` (``os.pread``) or
    ``os.sendfile``. While it is open the object is not evicted, by this process or any other
    using the same directory.

    ``verified`` is False for a large object this process has not hashed whole since it
    adopted the file: whoever sends it hashes what it sends, then calls ``confirm`` (hashed
    whole, intact: later opens may skip hashing) or ``condemn`` (mismatch: the object is
    removed and counted in ``corrupt_objects``; the sender must cut its client off).
    """

    def __init__(
        self,
        digest: str,
        size: int,
        *,
        fd: int = -1,
        data: bytes | None = None,
        verified: bool = True,
        on_close: Callable[[], None] | None = None,
        on_verdict: Callable[[bool], None] | None = None,
    ) -> None:
        self.digest = digest
        self.size = size
        self.fd = fd
        self.data = data
        self.verified = verified
        self._on_close = on_close
        self._on_verdict = on_verdict
        self.closed = False

    def read(self, offset: int, length: int) -> bytes:
        if self.data is not None:
            return self.data[offset : offset + length]
        return os.pread(self.fd, length, offset)

    def confirm(self) -> None:
        """The whole object was hashed to its digest."""
        if not self.verified:
            self.verified = True
            if self._on_verdict is not None:
                self._on_verdict(True)

    def condemn(self) -> None:
        """The whole object was hashed and is NOT its digest: remove it from the store."""
        if self._on_verdict is not None:
            verdict, self._on_verdict = self._on_verdict, None
            self.verified = False
            verdict(False)

    def read_verified(self, limit: int) -> bytes | None:
        """All the bytes (up to ``limit`` in size), hashed against the digest: None when the
        object is larger than ``limit`` or corrupt (then it is condemned). Blocking for
        ``size`` bytes: meant for manifests, which are at most a few MiB."""
        if self.data is not None:
            return self.data
        if self.size > limit:
            return None
        data = read_all(self.fd, self.size)
        if len(data) == self.size and hashlib.sha256(data).hexdigest() == sha256_hex(self.digest):
            self.confirm()
            return data
        self.condemn()
        return None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.fd >= 0:
            os.close(self.fd)
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> StoredObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ObjectReader:
    """Lookups and opens; every disk error is a miss, never an exception to a request."""

    log = Logger()

    def __init__(
        self,
        catalog: Catalog,
        layout: Layout,
        locks: ProcessLocks,
        evictor: Evictor,
        metrics: CacheMetrics,
        clock: Callable[[], float],
        *,
        failures: WriteFailures,
        small_object_size: int,
        atime_resolution: float,
    ) -> None:
        self.small_object_size = small_object_size
        self._failures = failures
        self._catalog = catalog
        self._layout = layout
        self._locks = locks
        self._evictor = evictor
        self._metrics = metrics
        self._clock = clock
        self._atime_resolution = atime_resolution
        # Files found corrupt that could not be removed (a read-only volume): never again.
        self._condemned: set[tuple[str, int]] = set()

    def contains(self, digest: str) -> bool:
        hex_ = sha256_hex(digest)
        try:
            stat = os.stat(self._layout.object_path(hex_))
        except OSError:
            entry = self._catalog.entries.get(hex_)
            if entry is not None and entry.readers == 0:
                self._catalog.forget(hex_)
            return False
        if (hex_, stat.st_ino) in self._condemned:
            return False
        entry = self._catalog.entries.get(hex_)
        if entry is None or entry.ino != stat.st_ino:
            self._catalog.adopt(hex_, stat)
        return True

    def open_object(self, digest: str) -> StoredObject | None:
        """The committed object, checked and held open, or None (then it is a miss).

        None also when another process holds the digest exclusively (it is downloading or
        evicting it): either way there is nothing trustworthy to read yet.
        """
        hex_ = sha256_hex(digest)
        entry = self._catalog.entries.get(hex_)
        if entry is not None and entry.size <= self.small_object_size:
            small = self._open_small(digest, hex_)
            if small is not None:
                return small
            # Changed, gone or corrupt: the full path below decides, under the lock.
        try:
            found = self._open_locked(digest, hex_)
        except OSError as error:
            # Mostly the read lock's file that cannot be created (a read-only volume, its
            # directory gone): a write, reported like the others, once per streak.
            self._failures.failed("objects", "open", error)
            found = None
        else:
            self._failures.succeeded("objects", "open")
        self._metrics.count("misses" if found is None else "hits")
        return found

    def _open_locked(self, digest: str, hex_: str) -> StoredObject | None:
        lock = self._locks.shared(hex_)
        if lock is None:
            return None
        try:
            fd = os.open(self._layout.object_path(hex_), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            lock.release()
            entry = self._catalog.entries.get(hex_)
            if entry is not None and entry.readers == 0:
                self._catalog.forget(hex_)
            return None
        except BaseException:
            lock.release()
            raise
        try:
            trusted = self._check(hex_, fd)
        except BaseException:
            os.close(fd)
            lock.release()
            raise
        if trusted is None:
            ino = os.fstat(fd).st_ino
            os.close(fd)
            lock.release()
            if (hex_, ino) not in self._condemned:
                self._condemn(hex_, ino)
            return None
        entry, data = trusted
        self._served(entry, fd)
        if data is not None:
            os.close(fd)
            lock.release()
            return StoredObject(digest, entry.size, data=data)
        return self._held(digest, hex_, entry, fd, lock)

    def _open_small(self, digest: str, hex_: str) -> StoredObject | None:
        """A small object needs no lock: it is read whole, at once, and rehashed; an eviction
        racing with the read leaves our descriptor on the intact file."""
        try:
            fd = os.open(self._layout.object_path(hex_), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            trusted = self._check(hex_, fd)
            if trusted is None or trusted[1] is None:
                return None
            entry, data = trusted
            self._served(entry, fd)
        except OSError:
            return None
        finally:
            os.close(fd)
        self._metrics.count("hits")
        return StoredObject(digest, entry.size, data=data)

    def open_committed(
        self, digest: str, hex_: str, fd: int, lock: HeldLock | None
    ) -> StoredObject:
        """A reader for an object this process has just committed and verified, on the
        writer's own descriptor (no reopen that a vanished directory could fail)."""
        return self._held(digest, hex_, self._catalog.entries[hex_], fd, lock)

    def _held(
        self, digest: str, hex_: str, entry: Entry, fd: int, lock: HeldLock | None
    ) -> StoredObject:
        entry.readers += 1
        ino = entry.ino

        def closed() -> None:
            # The entry the reader opened, even if the digest has been replaced since.
            entry.readers -= 1
            if lock is not None:
                lock.release()

        def verdict(intact: bool) -> None:
            if intact:
                self._catalog.mark_verified(hex_, ino)
            else:
                self.log.warn("cached object {hex} is corrupt; dropping it", hex=hex_)
                self._condemn(hex_, ino)

        return StoredObject(
            digest,
            entry.size,
            fd=fd,
            verified=entry.verified,
            on_close=closed,
            on_verdict=verdict,
        )

    def _condemn(self, hex_: str, ino: int) -> None:
        if not self._evictor.discard(hex_, ino):
            if len(self._condemned) >= _CONDEMNED_LIMIT:
                self._condemned.clear()
            self._condemned.add((hex_, ino))

    def _served(self, entry: Entry, fd: int) -> None:
        now = self._clock()
        entry.last_served = now
        if now - entry.atime_written >= self._atime_resolution:
            # Last served time for other processes and the next start-up; on our own
            # descriptor, so a file another process put in place since is not touched.
            entry.atime_written = now
            with contextlib.suppress(OSError):
                os.utime(fd, ns=(int(now * 1e9), entry.mtime_ns))

    def _check(self, hex_: str, fd: int) -> tuple[Entry, bytes | None] | None:
        """Is the open file the one a verifier renamed into place? Returns its entry, and its
        bytes if it is small (read and rehashed here); None if it cannot be trusted."""
        stat = os.fstat(fd)
        if (hex_, stat.st_ino) in self._condemned:
            return None
        entry = self._catalog.entries.get(hex_)
        if entry is None or entry.ino != stat.st_ino:
            # New to us: a rename put it there (this process's or another's verifier).
            entry = self._catalog.adopt(hex_, stat)
        elif (entry.size, entry.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            if stat.st_size > self.small_object_size:
                self.log.warn("cached object {hex} changed on disk; dropping it", hex=hex_)
                return None
            # A small one is rehashed below anyway: a touched but intact file stays.
            self._catalog.set_size(entry, stat.st_size)
            entry.mtime_ns = stat.st_mtime_ns
        if stat.st_size > self.small_object_size:
            return entry, None
        data = read_all(fd, stat.st_size)
        if hashlib.sha256(data).hexdigest() != hex_:
            self.log.warn("cached object {hex} is corrupt; dropping it", hex=hex_)
            return None
        entry.verified = True
        return entry, data


def hash_file(path: str, chunk: int = HASH_CHUNK) -> tuple[int, str] | None:
    """(inode, sha256 hex) of the file at ``path``, or None if it is gone. Only reads."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        ino = os.fstat(fd).st_ino
        hasher = hashlib.sha256()
        offset = 0
        while data := os.pread(fd, chunk, offset):
            hasher.update(data)
            offset += len(data)
    finally:
        os.close(fd)
    return ino, hasher.hexdigest()
