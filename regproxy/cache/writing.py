"""Writing an object: a temporary file in its final directory, hashed while it is written,
fsynced, and renamed into place only when its sha256 is the digest it is named by.

Any I/O failure (a full or read-only volume, a failing disk, a deleted directory) leaves
nothing half-visible: the temporary file is removed, the download lock released, the failure
counted and logged once per streak, and ``StoreUnwritable`` raised for the caller to go on
without storing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import TYPE_CHECKING, Any

from .faults import StoreUnwritable
from .layout import download_key, fsync_directory
from .locks import HeldLock
from .objects import sha256_hex

if TYPE_CHECKING:
    from .reading import StoredObject
    from .store import CacheStore

OBJECTS = "objects"


class DigestMismatch(Exception):
    """The bytes written do not hash to the digest they were written as."""


class TooLarge(Exception):
    """The object alone is larger than the cache may grow; it was verified but not kept."""


class PendingObject:
    """A download being written: ``write`` bytes, then ``commit`` (or ``abort``).

    It holds the digest's download lock, so no other process downloads the same digest at the
    same time (and no start-up clean-up removes its temporary file). ``fd`` is the temporary
    file; readers of the download ``os.dup`` it and ``pread`` from it, which keeps working
    after the rename, an eviction, and even after a failed write removed the file.
    """

    def __init__(self, store: CacheStore, digest: str, hex_: str, lock: HeldLock) -> None:
        self.store = store
        self.digest = digest
        self.hex = hex_
        self.size = 0
        self._lock = lock
        self._hash = hashlib.sha256()
        self.final_path = store.object_path(hex_)
        self.temp_path = store.layout.temp_path(hex_)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            self.fd = os.open(self.temp_path, flags, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(self.temp_path), exist_ok=True)
            self.fd = os.open(self.temp_path, flags, 0o644)
        self.finished = False
        self._synced = -1
        self._counted = True
        self._sync_error: OSError | None = None

    def write(self, data: bytes) -> None:
        """Append ``data``. On an I/O error the object is aborted and ``StoreUnwritable``
        raised: the bytes already handed out through ``fd`` stay readable."""
        if self.finished:
            raise ValueError("write after commit or abort")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError as error:
            raise self._failed("write", error) from error
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
        the reactor goes on (it touches nothing but the descriptor). Raises
        ``StoreUnwritable``; the failure is reported by the ``abort`` that follows, on the
        reactor thread."""
        try:
            os.fsync(self.fd)
        except OSError as error:
            self._sync_error = error
            raise StoreUnwritable("fsync", error) from error
        self._synced = self.size

    def verified(self) -> bool:
        """Whether the bytes so far hash to the digest (the check ``commit`` makes)."""
        return self._hash.hexdigest() == self.hex

    def running_hash(self) -> Any:
        """A copy of the sha256 of the bytes written so far (a download that lost its file
        goes on hashing from here)."""
        return self._hash.copy()

    def commit(self) -> StoredObject:
        """Verify, fsync, rename into place; returns the object, held open for reading.

        Raises ``DigestMismatch`` (nothing kept), ``TooLarge`` (verified, not kept) or
        ``StoreUnwritable`` (verified, could not be kept; nothing left behind).
        """
        if self.finished:
            raise ValueError("commit after commit or abort")
        store = self.store
        if not self.verified():
            store.metrics.count("digest_mismatches")
            store.log.warn(
                "digest mismatch for {digest}: {size} bytes hash to sha256:{actual}",
                digest=self.digest,
                size=self.size,
                actual=self._hash.hexdigest(),
            )
            self.abort()
            raise DigestMismatch(self.digest)
        if self.size > store.max_size:
            self.abort()
            raise TooLarge(self.digest)
        if self._sync_error is not None:
            raise self._failed("fsync", self._sync_error)
        # Readers' lock first: no evictor (here or elsewhere) may take the object between
        # the rename and our first read. Busy only while another process evicts an older
        # copy; then we go without, and at worst the new file is evicted early.
        read_lock: HeldLock | None = None
        try:
            if store.fsync and self._synced != self.size:
                os.fsync(self.fd)
            with contextlib.suppress(OSError):
                read_lock = store._locks.shared(self.hex)
            os.rename(self.temp_path, self.final_path)
        except OSError as error:
            if read_lock is not None:
                read_lock.release()
            raise self._failed("commit", error) from error
        if store.fsync:
            with contextlib.suppress(OSError):
                fsync_directory(os.path.dirname(self.final_path))
        self.finished = True
        stat = os.fstat(self.fd)
        if self._counted:
            store._pending_grew(-self.size)
        store._committed(self, stat)
        store.write_failures.succeeded(OBJECTS)
        self._lock.release()
        return store._reader.open_committed(self.digest, self.hex, self.fd, read_lock)

    def abort(self) -> None:
        """Drop the temporary file and the lock (a failed or abandoned download)."""
        if self.finished:
            return
        self.finished = True
        with contextlib.suppress(OSError):
            os.unlink(self.temp_path)
        os.close(self.fd)
        if self._counted:
            self.store._pending_grew(-self.size)
        self._lock.release()
        if self._sync_error is not None:
            self.store.write_failures.failed(OBJECTS, "fsync", self._sync_error)
            self._sync_error = None

    def _failed(self, what: str, error: OSError) -> StoreUnwritable:
        self._sync_error = None
        self.abort()
        self.store.write_failures.failed(OBJECTS, what, error)
        return StoreUnwritable(what, error)


class ObjectWriter:
    """Who may write a digest: the one holder of its download lock, across processes."""

    def __init__(self, store: CacheStore) -> None:
        self._store = store

    def begin_write(self, digest: str) -> PendingObject | None:
        store = self._store
        hex_ = sha256_hex(digest)
        try:
            lock = store._locks.exclusive(download_key(hex_))
        except OSError as error:
            store.write_failures.failed(OBJECTS, "lock", error)
            raise StoreUnwritable("lock", error) from error
        if lock is None:
            return None
        if os.path.exists(store.object_path(hex_)):
            # Committed by another process between the caller's lookup and our lock.
            lock.release()
            return None
        try:
            return PendingObject(store, digest, hex_, lock)
        except OSError as error:
            lock.release()
            store.write_failures.failed(OBJECTS, "create", error)
            raise StoreUnwritable("create", error) from error
        except BaseException:
            lock.release()
            raise

    def writer_active(self, digest: str) -> bool:
        hex_ = sha256_hex(digest)
        try:
            lock = self._store._locks.exclusive(download_key(hex_))
        except OSError:
            return False  # no lock can be taken here: nobody downloads through this volume
        if lock is None:
            return True
        lock.release()
        return False
