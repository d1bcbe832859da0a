"""Start-up and rescans: clean what crashed writers left, learn what is on disk (``stat``
only, so start-up costs no blob reads), adopt what other processes committed and forget what
they evicted. Also the blocking full verification (``--cache-verify``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred

from .layout import TEMP_PREFIX, download_key, is_hex
from .objects import sha256_hex
from .reading import hash_file

if TYPE_CHECKING:
    from .store import CacheStore


Hashed = tuple[int, str] | None
"""(inode, sha256 hex) of a file hashed whole, or None: it was gone."""


@attrs.frozen
class StartReport:
    objects: int
    size: int
    temp_files_removed: int
    lock_files_removed: int


def start(store: CacheStore) -> StartReport:
    temps = rescan(store)
    locks = remove_orphan_lock_files(store)
    store.log.info(
        "cache at {root}: {objects} objects, {size} bytes; removed {temps} temporary files",
        root=store.root,
        objects=store.objects,
        size=store.size,
        temps=temps,
    )
    return StartReport(store.objects, store.size, temps, locks)


def rescan(store: CacheStore) -> int:
    """Re-learn the objects on disk; returns the temporary files removed.

    A temporary file is removed only when its digest's lock is free: a lock held means a
    live download (in this process or another), a free lock means its writer died.
    """
    catalog = store.catalog
    seen: set[str] = set()
    removed = 0
    for shard, name in store.layout.listing():
        if name.startswith(TEMP_PREFIX):
            removed += _remove_dead_temp(store, shard, name)
            continue
        if len(name) != 64 or not name.startswith(shard) or not is_hex(name):
            continue
        try:
            stat = os.stat(os.path.join(store.layout.blobs_dir, shard, name))
        except OSError:
            continue
        seen.add(name)
        entry = catalog.entries.get(name)
        if entry is not None and entry.ino == stat.st_ino:
            entry.last_served = max(entry.last_served, stat.st_atime)
        else:
            catalog.adopt(name, stat)
    for hex_ in [h for h, e in catalog.entries.items() if h not in seen and e.readers == 0]:
        catalog.forget(hex_)
    catalog.publish()
    store.enforce_bound()
    return removed


def _remove_dead_temp(store: CacheStore, shard: str, name: str) -> int:
    hex_ = name[len(TEMP_PREFIX) :].split("-", 1)[0]
    if len(hex_) != 64 or not is_hex(hex_):
        return 0
    try:
        lock = store._locks.exclusive(download_key(hex_))
    except OSError:
        return 0
    if lock is None:
        return 0
    try:
        os.unlink(os.path.join(store.layout.blobs_dir, shard, name))
        return 1
    except OSError:
        return 0
    finally:
        lock.release()


def remove_orphan_lock_files(store: CacheStore) -> int:
    removed = 0
    directory = store.layout.locks_dir
    try:
        shards = os.listdir(directory)
    except OSError:
        return 0
    for shard in shards:
        try:
            names = os.listdir(os.path.join(directory, shard))
        except OSError:
            continue
        for name in names:
            key = name.removesuffix(".lock")
            if key == name or key in store.catalog.entries:
                continue  # not a lock file, or the read lock of an object we hold
            try:
                lock = store._locks.exclusive(key)
            except OSError:
                continue
            if lock is not None:
                lock.release()  # an exclusive release removes the file
                removed += 1
    return removed


def verify_object(store: CacheStore, digest: str) -> bool:
    """Rehash one stored object; True if intact or gone. Only reads: safe in a thread."""
    hex_ = sha256_hex(digest)
    hashed = hash_file(store.object_path(hex_))
    return hashed is None or hashed[1] == hex_


def verify(store: CacheStore, min_size: int | None = None) -> list[str]:
    """Rehash every object of at least ``min_size`` bytes (default: the large ones, which
    opens do not rehash), discard the corrupt and mark the intact verified; returns the
    digests of the corrupt. Blocking: for start-up, or see ``verify_in_background``."""
    threshold = store.small_object_size + 1 if min_size is None else min_size
    corrupt = []
    for hex_, entry in list(store.catalog.entries.items()):
        if entry.size < threshold:
            continue
        hashed = hash_file(store.object_path(hex_))
        if hashed is None:
            continue
        if _apply(store, hex_, *hashed):
            corrupt.append("sha256:" + hex_)
    return corrupt


def _apply(store: CacheStore, hex_: str, ino: int, actual: str) -> bool:
    """Record a whole-file hash of inode ``ino``; True if it showed the object corrupt."""
    if actual == hex_:
        store.catalog.mark_verified(hex_, ino)
        return False
    store.log.warn("cached object {hex} failed verification", hex=hex_)
    store.evictor.discard(hex_, ino)
    return True


async def verify_in_background(
    store: CacheStore,
    run_in_thread: Callable[[Callable[[], Hashed]], Deferred[Hashed]],
) -> list[str]:
    """``verify`` without blocking the reactor: each large object is hashed in
    ``run_in_thread`` (e.g. ``lambda f: deferToThreadPool(reactor, pool, f)``), and the
    verdict applied back on the reactor thread. Returns the digests of the corrupt."""
    corrupt = []
    for digest in store.digests(min_size=store.small_object_size + 1):
        hex_ = sha256_hex(digest)
        hashed = await run_in_thread(partial(hash_file, store.object_path(hex_)))
        if hashed is not None and _apply(store, hex_, *hashed):
            corrupt.append(digest)
    return corrupt
