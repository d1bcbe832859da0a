"""Content-addressed objects on disk: ``blobs/sha256/ab/abcd...``, one file per digest.

An object is written to a temporary file in its final directory, hashed while it is written,
fsynced, and renamed into place only when its sha256 is the digest it is named by. A file at a
final path is therefore trusted as long as it is the file that was renamed there: its size,
modification time and inode are checked before each use, small objects are rehashed on every
read (they are read whole anyway), large ones by ``verify``.

The in-memory index (size, inode, last served) is rebuilt at start-up from directory listings
and ``stat`` alone, so start-up costs no blob reads. Each process keeps its own; objects other
processes commit are adopted when first looked up or at the next ``rescan``.

Eviction is least recently *served* first, by the process that writes, and never touches an
object with readers: readers in this process are counted, readers in other processes hold a
shared lock on the digest's lock file which an evictor must replace with an exclusive one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .index import CacheIndex
from .locks import HeldLock, ProcessLocks
from .metrics import CacheMetrics, NullMetrics
from .objects import sha256_hex

SMALL_OBJECT_SIZE = 64 * 1024
"""Objects up to this size (manifests, configs) are read whole and rehashed at every read."""

_TEMP_PREFIX = ".tmp-"
_WRITER = ".w"
"""Suffix of a digest's download lock key; the bare digest is its read lock key."""


def _download_key(hex_: str) -> str:
    return hex_ + _WRITER


_HASH_CHUNK = 1024 * 1024


class DigestMismatch(Exception):
    """The bytes written do not hash to the digest they were written as."""


class TooLarge(Exception):
    """The object alone is larger than the cache may grow; it was verified but not kept."""


@attrs.define(eq=False)
class _Entry:
    size: int
    mtime_ns: int
    ino: int
    last_served: float
    readers: int = 0
    atime_written: float = 0.0


@attrs.frozen
class StartReport:
    objects: int
    size: int
    temp_files_removed: int
    lock_files_removed: int


class StoredObject:
    """An open, trusted, committed object; ``close`` it when done (or use ``with``).

    Small objects come as ``data`` (read and verified in one go, nothing held open, ``fd`` is
    -1). Large ones as an open descriptor ``fd``: read them with ``read`` (``os.pread``, so
    readers sharing nothing interfere with nothing) or ``os.sendfile``. While it is open the
    object is not evicted, by this process or any other using the same directory.
    """

    def __init__(
        self,
        digest: str,
        size: int,
        *,
        fd: int = -1,
        data: bytes | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.digest = digest
        self.size = size
        self.fd = fd
        self.data = data
        self._on_close = on_close
        self.closed = False

    def read(self, offset: int, length: int) -> bytes:
        if self.data is not None:
            return self.data[offset : offset + length]
        return os.pread(self.fd, length, offset)

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


class PendingObject:
    """A download being written: ``write`` bytes, then ``commit`` (or ``abort``).

    It holds the digest's download lock, so no other process downloads the same digest at the
    same time (and no start-up clean-up removes its temporary file). ``fd`` is the temporary
    file; readers of the download ``os.dup`` it and ``pread`` from it, which keeps working
    after the rename (and even after an eviction).
    """

    def __init__(self, store: CacheStore, digest: str, hex_: str, lock: HeldLock) -> None:
        self.store = store
        self.digest = digest
        self.hex = hex_
        self.size = 0
        self._lock = lock
        self._hash = hashlib.sha256()
        self.final_path = store.object_path(hex_)
        directory = os.path.dirname(self.final_path)
        name = f"{_TEMP_PREFIX}{hex_}-{os.getpid()}-{secrets.token_hex(4)}"
        self.temp_path = os.path.join(directory, name)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            self.fd = os.open(self.temp_path, flags, 0o644)
        except FileNotFoundError:
            os.makedirs(directory, exist_ok=True)
            self.fd = os.open(self.temp_path, flags, 0o644)
        self.finished = False
        self._synced = -1
        self._counted = True

    def write(self, data: bytes) -> None:
        if self.finished:
            raise ValueError("write after commit or abort")
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self._hash.update(data)
        self.size += len(data)
        if self._counted:
            self.store._pending_grew(len(data))

    def exclude_from_accounting(self) -> None:
        """This object will not be kept (too large): its bytes must not push the cache into
        evicting everything else. ``commit`` will raise ``TooLarge``."""
        if self._counted:
            self._counted = False
            self.store._pending_grew(-self.size)

    def sync(self) -> None:
        """fsync the bytes written: the slow part of a commit, safe to run in a thread while
        the reactor goes on (it touches nothing but the descriptor)."""
        os.fsync(self.fd)
        self._synced = self.size

    def verified(self) -> bool:
        """Whether the bytes so far hash to the digest (the check ``commit`` makes)."""
        return self._hash.hexdigest() == self.hex

    def commit(self) -> StoredObject:
        """Verify, fsync, rename into place; returns the object, held open for reading.

        Raises ``DigestMismatch`` (nothing kept) or ``TooLarge`` (verified, not kept).
        """
        if self.finished:
            raise ValueError("commit after commit or abort")
        if not self.verified():
            self.store.metrics.count("digest_mismatches")
            self.store.log.warn(
                "digest mismatch for {digest}: {size} bytes hash to sha256:{actual}",
                digest=self.digest,
                size=self.size,
                actual=self._hash.hexdigest(),
            )
            self.abort()
            raise DigestMismatch(self.digest)
        if self.size > self.store.max_size:
            self.abort()
            raise TooLarge(self.digest)
        store = self.store
        if store.fsync and self._synced != self.size:
            os.fsync(self.fd)
        # Readers' lock first: no evictor (here or elsewhere) may take the object between
        # the rename and our first read. Busy only while another process evicts an older
        # copy; then we go without, and at worst the new file is evicted early.
        read_lock = store._locks.shared(self.hex)
        try:
            os.rename(self.temp_path, self.final_path)
        except BaseException:
            if read_lock is not None:
                read_lock.release()
            raise
        if store.fsync:
            _fsync_directory(os.path.dirname(self.final_path))
        self.finished = True
        stat = os.fstat(self.fd)
        os.close(self.fd)
        if self._counted:
            store._pending_grew(-self.size)
        store._committed(self, stat)
        self._lock.release()
        return store._reader(self.digest, self.hex, read_lock)

    # -- for downloads (download.py): added for streaming past a store failure --------------

    def running_hash(self) -> Any:
        """A copy of the sha256 of the bytes written so far (a download that lost its file
        goes on hashing from here)."""
        return self._hash.copy()

    def abort(self) -> None:
        """Drop the temporary file and the lock (a failed or abandoned download)."""
        if self.finished:
            return
        self.finished = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp_path)
        os.close(self.fd)
        if self._counted:
            self.store._pending_grew(-self.size)
        self._lock.release()


class CacheStore:
    """The objects under ``root`` and the index beside them.

    ``max_size`` bounds the bytes of committed objects plus downloads in progress in this
    process; when a write or a commit crosses it, the least recently served objects without
    readers are evicted until the total is ``eviction_slack`` below it (hysteresis, so a full
    cache is not swept once per write).
    """

    log = Logger()

    def __init__(
        self,
        root: str,
        *,
        max_size: int,
        clock: Callable[[], float] = time.time,
        metrics: CacheMetrics | None = None,
        small_object_size: int = SMALL_OBJECT_SIZE,
        eviction_slack: float = 0.05,
        atime_resolution: float = 60.0,
        fsync: bool = True,
    ) -> None:
        self.root = root
        self.max_size = max_size
        self.metrics: CacheMetrics = metrics if metrics is not None else NullMetrics()
        self.small_object_size = small_object_size
        self.fsync = fsync
        self._clock = clock
        self._eviction_slack = eviction_slack
        self._atime_resolution = atime_resolution
        self.blobs_dir = os.path.join(root, "blobs", "sha256")
        os.makedirs(self.blobs_dir, exist_ok=True)
        self._locks = ProcessLocks(os.path.join(root, "locks"))
        self.index = CacheIndex(os.path.join(root, "index"), clock=clock)
        self._entries: dict[str, _Entry] = {}
        self._size = 0
        self._pending = 0
        self._warned_at = float("-inf")

    # Paths and figures.

    def object_path(self, hex_: str) -> str:
        return os.path.join(self.blobs_dir, hex_[:2], hex_)

    @property
    def size(self) -> int:
        """Bytes of committed objects this process knows of."""
        return self._size

    @property
    def pending_size(self) -> int:
        """Bytes written so far by this process's downloads in progress."""
        return self._pending

    @property
    def objects(self) -> int:
        return len(self._entries)

    # Start-up and rescans.

    def start(self) -> StartReport:
        """Clean what crashed writers left and learn what is on disk (stat only)."""
        temps = self.rescan()
        locks = self._remove_orphan_lock_files()
        self.log.info(
            "cache at {root}: {objects} objects, {size} bytes; removed {temps} temporary files",
            root=self.root,
            objects=self.objects,
            size=self._size,
            temps=temps,
        )
        return StartReport(self.objects, self._size, temps, locks)

    def rescan(self) -> int:
        """Re-learn the objects on disk: adopt new ones, forget vanished ones, refresh last
        served times other processes recorded. Returns the temporary files removed.

        A temporary file is removed only when its digest's lock is free: a lock held means a
        live download (in this process or another), a free lock means its writer died.
        """
        seen: set[str] = set()
        removed = 0
        for shard, name in self._listing():
            if name.startswith(_TEMP_PREFIX):
                removed += self._remove_dead_temp(shard, name)
                continue
            if len(name) != 64 or not name.startswith(shard) or not _is_hex(name):
                continue
            try:
                stat = os.stat(os.path.join(self.blobs_dir, shard, name))
            except FileNotFoundError:
                continue
            seen.add(name)
            entry = self._entries.get(name)
            if entry is not None and entry.ino == stat.st_ino:
                entry.last_served = max(entry.last_served, stat.st_atime)
            else:
                self._adopt(name, stat)
        for hex_ in [h for h, e in self._entries.items() if h not in seen and e.readers == 0]:
            self._forget(hex_)
        self._publish()
        self.enforce_bound()
        return removed

    def _listing(self) -> Iterator[tuple[str, str]]:
        try:
            shards = sorted(os.listdir(self.blobs_dir))
        except FileNotFoundError:
            return
        for shard in shards:
            if len(shard) != 2 or not _is_hex(shard):
                continue
            try:
                names = os.listdir(os.path.join(self.blobs_dir, shard))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                yield shard, name

    def _remove_dead_temp(self, shard: str, name: str) -> int:
        hex_ = name[len(_TEMP_PREFIX) :].split("-", 1)[0]
        if len(hex_) != 64 or not _is_hex(hex_):
            return 0
        lock = self._locks.exclusive(_download_key(hex_))
        if lock is None:
            return 0
        try:
            os.unlink(os.path.join(self.blobs_dir, shard, name))
            return 1
        except FileNotFoundError:
            return 0
        finally:
            lock.release()

    def _remove_orphan_lock_files(self) -> int:
        removed = 0
        directory = self._locks.directory
        try:
            shards = os.listdir(directory)
        except FileNotFoundError:
            return 0
        for shard in shards:
            try:
                names = os.listdir(os.path.join(directory, shard))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                key = name.removesuffix(".lock")
                if key == name or key in self._entries:
                    continue  # not a lock file, or the read lock of an object we hold
                lock = self._locks.exclusive(key)
                if lock is not None:
                    lock.release()  # an exclusive release removes the file
                    removed += 1
        return removed

    # Lookups.

    def contains(self, digest: str) -> bool:
        """Whether a committed object is on disk (by this process or another)."""
        hex_ = sha256_hex(digest)
        try:
            stat = os.stat(self.object_path(hex_))
        except FileNotFoundError:
            if hex_ in self._entries and self._entries[hex_].readers == 0:
                self._forget(hex_)
            return False
        if hex_ not in self._entries:
            self._adopt(hex_, stat)
        return True

    def open_object(self, digest: str) -> StoredObject | None:
        """The committed object, checked and held open, or None (then it is a miss).

        None also when another process holds the digest exclusively (it is downloading or
        evicting it): either way there is nothing trustworthy to read yet.
        """
        hex_ = sha256_hex(digest)
        entry = self._entries.get(hex_)
        if entry is not None and entry.size <= self.small_object_size:
            small = self._open_small(digest, hex_)
            if small is not None:
                return small
            # Changed, gone or corrupt: the full path below decides, under the lock.
        lock = self._locks.shared(hex_)
        if lock is None:
            self.metrics.count("misses")
            return None
        try:
            fd = os.open(self.object_path(hex_), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            lock.release()
            entry = self._entries.get(hex_)
            if entry is not None and entry.readers == 0:
                self._forget(hex_)
            self.metrics.count("misses")
            return None
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
            self._discard(hex_, ino)
            self.metrics.count("misses")
            return None
        entry, data = trusted
        self._served(entry, fd)
        self.metrics.count("hits")
        if data is not None:
            os.close(fd)
            lock.release()
            return StoredObject(digest, entry.size, data=data)
        entry.readers += 1
        return StoredObject(
            digest, entry.size, fd=fd, on_close=lambda: self._reader_closed(entry, lock)
        )

    def _open_small(self, digest: str, hex_: str) -> StoredObject | None:
        """A small object needs no lock: it is read whole, at once, and rehashed; an eviction
        racing with the read leaves our descriptor on the intact file."""
        try:
            fd = os.open(self.object_path(hex_), os.O_RDONLY | os.O_CLOEXEC)
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
        self.metrics.count("hits")
        return StoredObject(digest, entry.size, data=data)

    def _served(self, entry: _Entry, fd: int) -> None:
        now = self._clock()
        entry.last_served = now
        if now - entry.atime_written >= self._atime_resolution:
            # Last served time for other processes and the next start-up; on our own
            # descriptor, so a file another process put in place since is not touched.
            entry.atime_written = now
            with contextlib.suppress(OSError):
                os.utime(fd, ns=(int(now * 1e9), entry.mtime_ns))

    def _check(self, hex_: str, fd: int) -> tuple[_Entry, bytes | None] | None:
        """Is the open file the one a verifier renamed into place? Returns its entry, and its
        bytes if it is small (read and rehashed here); None if it cannot be trusted."""
        stat = os.fstat(fd)
        entry = self._entries.get(hex_)
        if entry is None or entry.ino != stat.st_ino:
            # New to us: a rename put it there (this process's or another's verifier).
            entry = self._adopt(hex_, stat)
        elif (entry.size, entry.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            if stat.st_size > self.small_object_size:
                self.log.warn("cached object {hex} changed on disk; dropping it", hex=hex_)
                return None
            # A small one is rehashed below anyway: a touched but intact file stays.
            self._set_size(entry, stat.st_size)
            entry.mtime_ns = stat.st_mtime_ns
        if stat.st_size > self.small_object_size:
            return entry, None
        data = _read_all(fd, stat.st_size)
        if hashlib.sha256(data).hexdigest() != hex_:
            self.log.warn("cached object {hex} is corrupt; dropping it", hex=hex_)
            return None
        return entry, data

    def _reader(self, digest: str, hex_: str, lock: HeldLock | None) -> StoredObject:
        """A reader for an object this process has just committed (lock already shared)."""
        entry = self._entries[hex_]
        fd = os.open(self.object_path(hex_), os.O_RDONLY | os.O_CLOEXEC)
        entry.readers += 1
        return StoredObject(
            digest, entry.size, fd=fd, on_close=lambda: self._reader_closed(entry, lock)
        )

    def _reader_closed(self, entry: _Entry, lock: HeldLock | None) -> None:
        # The entry the reader opened, even if the digest has been replaced since.
        entry.readers -= 1
        if lock is not None:
            lock.release()

    # Writing.

    def begin_write(self, digest: str) -> PendingObject | None:
        """Start writing ``digest``, or None when it is not ours to write: another download
        of it is running (in this process or another), it is being evicted, or it is already
        stored (``open_object`` it).
        """
        hex_ = sha256_hex(digest)
        lock = self._locks.exclusive(_download_key(hex_))
        if lock is None:
            return None
        if os.path.exists(self.object_path(hex_)):
            # Committed by another process between the caller's lookup and our lock.
            lock.release()
            return None
        try:
            return PendingObject(self, digest, hex_, lock)
        except BaseException:
            lock.release()
            raise

    def writer_active(self, digest: str) -> bool:
        """Whether some process (this one included) holds the digest's download lock.

        Used by a process waiting for another one's download: when the lock is free and the
        object still absent, that download failed and it is this process's turn.
        """
        hex_ = sha256_hex(digest)
        lock = self._locks.exclusive(_download_key(hex_))
        if lock is None:
            return True
        lock.release()
        return False

    def _pending_grew(self, amount: int) -> None:
        self._pending += amount
        if amount > 0 and self._size + self._pending > self.max_size:
            self.enforce_bound()

    def _committed(self, pending: PendingObject, stat: os.stat_result) -> _Entry:
        entry = self._adopt(pending.hex, stat)
        entry.last_served = self._clock()
        self.enforce_bound(keep=pending.hex)
        self._publish()
        return entry

    # Eviction.

    def enforce_bound(self, keep: str | None = None) -> int:
        """Evict least recently served objects until under the bound; returns bytes freed."""
        if self._size + self._pending <= self.max_size:
            return 0
        target = int(self.max_size * (1 - self._eviction_slack))
        freed = 0
        for hex_, entry in sorted(self._entries.items(), key=lambda item: item[1].last_served):
            if self._size + self._pending <= target:
                break
            if hex_ == keep or entry.readers > 0:
                continue
            if self._evict(hex_):
                freed += entry.size
        now = self._clock()
        if self._size + self._pending > self.max_size and now - self._warned_at > 60:
            self._warned_at = now
            self.log.warn(
                "cache over its bound: {size} bytes (+{pending} downloading) > {bound}; "
                "the rest is being read",
                size=self._size,
                pending=self._pending,
                bound=self.max_size,
            )
        return freed

    def _evict(self, hex_: str) -> bool:
        lock = self._locks.exclusive(hex_)
        if lock is None:
            return False  # read or written by someone, here or in another process
        try:
            entry = self._entries.get(hex_)
            try:
                os.unlink(self.object_path(hex_))
            except FileNotFoundError:
                pass  # another process evicted it first
            else:
                self.metrics.count("evictions")
                if entry is not None:
                    self.metrics.count("evicted_bytes", entry.size)
            self._forget(hex_)
        finally:
            lock.release()
        self._publish()
        return True

    def discard(self, digest: str) -> bool:
        """Remove an object found to be corrupt; True if it was there."""
        return self._discard(sha256_hex(digest))

    def _discard(self, hex_: str, ino: int | None = None) -> bool:
        """Remove a corrupt object at once, even while it is being read: readers that have it
        open keep their descriptor (nothing can make their bytes right now), and nobody new
        gets it. Only the file found corrupt (``ino``) goes, never a good copy another
        process has put in place since."""
        self.metrics.count("corrupt_objects")
        path = self.object_path(hex_)
        try:
            if ino is not None and os.stat(path).st_ino != ino:
                return False
            os.unlink(path)
            removed = True
        except FileNotFoundError:
            removed = False
        self._forget(hex_)
        self._publish()
        return removed

    # Verification of large objects.

    def verify_object(self, digest: str) -> bool:
        """Rehash one stored object; True if intact or gone. Only reads: safe in a thread."""
        hex_ = sha256_hex(digest)
        try:
            fd = os.open(self.object_path(hex_), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            digest_of = hashlib.sha256()
            offset = 0
            while chunk := os.pread(fd, _HASH_CHUNK, offset):
                digest_of.update(chunk)
                offset += len(chunk)
        finally:
            os.close(fd)
        return digest_of.hexdigest() == hex_

    def digests(self, min_size: int = 0) -> list[str]:
        """The digests of the objects this process knows of, of at least ``min_size`` bytes."""
        return ["sha256:" + h for h, e in self._entries.items() if e.size >= min_size]

    def verify(self, min_size: int | None = None) -> list[str]:
        """Rehash every object of at least ``min_size`` bytes (default: the large ones,
        which reads do not rehash) and discard the corrupt; returns their digests.

        Blocking: run it at start-up (``--cache-verify``) or object by object from a thread
        with ``verify_object`` then ``discard``.
        """
        threshold = self.small_object_size + 1 if min_size is None else min_size
        corrupt = []
        for hex_, entry in list(self._entries.items()):
            if entry.size >= threshold and not self.verify_object("sha256:" + hex_):
                self.log.warn("cached object {hex} failed verification", hex=hex_)
                self._discard(hex_)
                corrupt.append("sha256:" + hex_)
        return corrupt

    # Bookkeeping.

    def _adopt(self, hex_: str, stat: os.stat_result) -> _Entry:
        old = self._entries.get(hex_)
        if old is not None:
            self._size -= old.size
        entry = _Entry(
            size=stat.st_size,
            mtime_ns=stat.st_mtime_ns,
            ino=stat.st_ino,
            last_served=max(stat.st_atime, stat.st_mtime),
        )
        self._entries[hex_] = entry
        self._size += entry.size
        return entry

    def _set_size(self, entry: _Entry, size: int) -> None:
        self._size += size - entry.size
        entry.size = size

    def _forget(self, hex_: str) -> None:
        entry = self._entries.pop(hex_, None)
        if entry is not None:
            self._size -= entry.size

    def _publish(self) -> None:
        self.metrics.gauge("size_bytes", self._size)
        self.metrics.gauge("objects", len(self._entries))


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _read_all(fd: int, size: int) -> bytes:
    parts = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the file itself is synced
    finally:
        os.close(fd)


async def verify_in_background(
    store: CacheStore, run_in_thread: Callable[[Callable[[], bool]], Deferred[bool]]
) -> list[str]:
    """``CacheStore.verify`` without blocking the reactor: each large object is rehashed in
    ``run_in_thread`` (e.g. ``lambda f: deferToThreadPool(reactor, pool, f)``), and the
    corrupt are discarded back on the reactor thread. Returns their digests."""
    corrupt = []
    for digest in store.digests(min_size=store.small_object_size + 1):
        intact = await run_in_thread(partial(store.verify_object, digest))
        if not intact:
            store.log.warn("cached object {digest} failed verification", digest=digest)
            store.discard(digest)
            corrupt.append(digest)
    return corrupt


def open_store(
    root: str,
    *,
    max_size: int,
    clock: Callable[[], float] = time.time,
    metrics: CacheMetrics | None = None,
    small_object_size: int = SMALL_OBJECT_SIZE,
    eviction_slack: float = 0.05,
    atime_resolution: float = 60.0,
    fsync: bool = True,
) -> CacheStore:
    """A started store (clean-up and index rebuild done): ``CacheStore(...)`` + ``start()``."""
    store = CacheStore(
        root,
        max_size=max_size,
        clock=clock,
        metrics=metrics,
        small_object_size=small_object_size,
        eviction_slack=eviction_slack,
        atime_resolution=atime_resolution,
        fsync=fsync,
    )
    store.start()
    return store
