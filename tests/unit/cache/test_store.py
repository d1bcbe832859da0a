"""The content-addressed store: verified commits, crash clean-up, trust checks, eviction,
and several processes on one directory (real processes, real fcntl locks)."""

from __future__ import annotations

import builtins
import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from regproxy.cache.faults import WriteFailures
from regproxy.cache.locks import ProcessLocks
from regproxy.cache.metrics import RecordingMetrics
from regproxy.cache.objects import NotCacheable
from regproxy.cache.sizes import default_max_size, parse_size
from regproxy.cache.store import (
    CacheStore,
    DigestMismatch,
    StoreUnwritable,
    TooLarge,
    open_store,
    verify_in_background,
)

from .cache_faults import FailingVolume
from .cache_helpers import FakeClock, digest_of

KIB = 1024


def make_store(root: Path, **kwargs: Any) -> CacheStore:
    kwargs.setdefault("max_size", 10 * 1024 * KIB)
    kwargs.setdefault("clock", FakeClock())
    kwargs.setdefault("fsync", False)
    return open_store(str(root), **kwargs)


def put(store: CacheStore, data: bytes) -> str:
    digest = digest_of(data)
    pending = store.begin_write(digest)
    assert pending is not None
    pending.write(data[: len(data) // 2])
    pending.write(data[len(data) // 2 :])
    store_reader = pending.commit()
    store_reader.close()
    return digest


def read(store: CacheStore, digest: str) -> bytes | None:
    obj = store.open_object(digest)
    if obj is None:
        return None
    with obj:
        return obj.read(0, obj.size)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# Sizes.


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("50G", 50 * 1024**3),
        ("500M", 500 * 1024**2),
        ("1.5k", 1536),
        ("123", 123),
        ("2GiB", 2 * 1024**3),
        ("10 MB", 10 * 1024**2),
    ],
)
def test_parse_size_reads_operator_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-5M", "0", "5X", "five"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_default_max_size_is_most_of_the_free_space(tmp_path: Path) -> None:
    stats = os.statvfs(tmp_path)
    free = stats.f_bavail * stats.f_frsize
    assert 0.7 * free <= default_max_size(str(tmp_path)) <= 0.9 * free + 1


# Writing.


def test_committed_object_is_stored_by_digest_with_no_temporary_left(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = b"x" * 100_000
    digest = put(store, data)
    hex_ = digest.split(":")[1]
    assert files_under(tmp_path / "blobs") == [f"sha256/{hex_[:2]}/{hex_}"]
    assert read(store, digest) == data
    assert store.size == len(data) and store.objects == 1


def test_mismatched_bytes_are_never_committed(tmp_path: Path) -> None:
    metrics = RecordingMetrics()
    store = make_store(tmp_path, metrics=metrics)
    digest = digest_of(b"the real bytes")
    pending = store.begin_write(digest)
    assert pending is not None
    pending.write(b"other bytes")
    with pytest.raises(DigestMismatch):
        pending.commit()
    assert files_under(tmp_path / "blobs") == []
    assert store.open_object(digest) is None
    assert store.size == 0 and store.pending_size == 0
    assert metrics.counters["digest_mismatches"] == 1
    # The lock was released: a new download may start.
    assert store.begin_write(digest) is not None


def test_only_sha256_digests_are_cacheable(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with pytest.raises(NotCacheable):
        store.begin_write("sha512:" + "a" * 128)
    with pytest.raises(NotCacheable):
        store.open_object("sha256:../../etc/passwd")


def test_one_download_per_digest_in_a_process(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    digest = digest_of(b"abc")
    first = store.begin_write(digest)
    assert first is not None
    assert store.begin_write(digest) is None
    assert store.writer_active(digest)
    first.abort()
    assert not store.writer_active(digest)


def test_begin_write_refuses_a_stored_object(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    digest = put(store, b"abc")
    assert store.begin_write(digest) is None


def test_an_object_larger_than_the_cache_is_not_kept(tmp_path: Path) -> None:
    store = make_store(tmp_path, max_size=10 * KIB)
    data = os.urandom(20 * KIB)
    pending = store.begin_write(digest_of(data))
    assert pending is not None
    pending.write(data)
    with pytest.raises(TooLarge):
        pending.commit()
    assert files_under(tmp_path / "blobs") == []


def test_mismatch_on_commit_after_writes_counts_nothing_stored(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = b"y" * 5000
    pending = store.begin_write(digest_of(data))
    assert pending is not None
    pending.write(data[:-1] + b"z")
    assert not pending.verified()
    with pytest.raises(DigestMismatch):
        pending.commit()
    assert store.objects == 0


# Start-up.


def test_start_removes_temporary_files_of_dead_writers(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = b"partial download"
    pending = store.begin_write(digest_of(data))
    assert pending is not None
    pending.write(data[:5])
    temp = pending.temp_path
    # Simulate kill -9: the process's descriptors and locks vanish, the file stays.
    os.close(pending.fd)
    store._locks._held.clear()
    assert os.path.exists(temp)
    fresh = make_store(tmp_path)
    assert not os.path.exists(temp)
    assert fresh.open_object(digest_of(data)) is None
    assert fresh.objects == 0


def test_start_rebuilds_the_index_without_reading_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path)
    blobs = [os.urandom(n) for n in (10, 70_000, 200_000)]
    for blob in blobs:
        put(store, blob)

    def no_reads(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("start-up read an object")

    monkeypatch.setattr(os, "pread", no_reads)
    monkeypatch.setattr(os, "read", no_reads)
    monkeypatch.setattr(builtins, "open", no_reads)
    fresh = make_store(tmp_path)
    monkeypatch.undo()
    assert fresh.objects == 3
    assert fresh.size == sum(len(b) for b in blobs)
    for blob in blobs:
        assert read(fresh, digest_of(blob)) == blob


def test_start_ignores_strangers_in_the_blob_directory(tmp_path: Path) -> None:
    (tmp_path / "blobs" / "sha256" / "zz").mkdir(parents=True)
    (tmp_path / "blobs" / "sha256" / "zz" / "junk").write_bytes(b"1")
    (tmp_path / "blobs" / "sha256" / "ab").mkdir()
    (tmp_path / "blobs" / "sha256" / "ab" / ("cd" + "0" * 62)).write_bytes(b"wrong shard")
    assert make_store(tmp_path).objects == 0


# Trust checks.


def test_a_large_object_changed_in_place_is_not_served(tmp_path: Path) -> None:
    store = make_store(tmp_path, small_object_size=1024)
    data = os.urandom(8 * KIB)
    digest = put(store, data)
    path = store.object_path(digest.split(":")[1])
    with open(path, "ab") as file:
        file.write(b"appended")
    assert store.open_object(digest) is None
    assert not os.path.exists(path)


def test_a_small_object_is_rehashed_on_every_read(tmp_path: Path) -> None:
    metrics = RecordingMetrics()
    store = make_store(tmp_path, metrics=metrics)
    data = b'{"schemaVersion": 2}'
    digest = put(store, data)
    path = store.object_path(digest.split(":")[1])
    stat = os.stat(path)
    with open(path, "r+b") as file:
        file.write(b"[")  # same size...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...and same mtime
    assert store.open_object(digest) is None
    assert metrics.counters["corrupt_objects"] == 1


def test_a_small_object_touched_but_intact_is_still_served(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    digest = put(store, b"manifest")
    os.utime(store.object_path(digest.split(":")[1]), (1, 1))
    assert read(store, digest) == b"manifest"


def test_an_object_another_process_renamed_into_place_is_adopted(tmp_path: Path) -> None:
    mine = make_store(tmp_path)
    other = CacheStore(str(tmp_path), max_size=10 * 1024 * KIB, fsync=False)
    data = os.urandom(100 * KIB)
    digest = put(other, data)
    assert mine.contains(digest)
    assert read(mine, digest) == data
    assert mine.size == len(data)


def test_verify_finds_a_corrupt_large_object_of_the_same_size_and_mtime(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = os.urandom(200 * KIB)
    digest = put(store, data)
    good = put(store, os.urandom(200 * KIB))
    path = store.object_path(digest.split(":")[1])
    stat = os.stat(path)
    with open(path, "r+b") as file:
        file.seek(100 * KIB)
        file.write(b"\0\0\0\0")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert store.verify() == [digest]
    assert not os.path.exists(path)
    assert store.contains(good)


# Eviction.


def test_eviction_drops_the_least_recently_served_first(tmp_path: Path) -> None:
    clock = FakeClock()
    metrics = RecordingMetrics()
    store = make_store(tmp_path, max_size=35 * KIB, clock=clock, metrics=metrics)
    digests = []
    for i in range(3):
        clock.advance(10)
        digests.append(put(store, bytes([i]) * (10 * KIB)))
    clock.advance(10)
    assert read(store, digests[0]) is not None  # served: now the most recent
    clock.advance(10)
    put(store, b"\xff" * (10 * KIB))
    assert store.contains(digests[0])
    assert not store.contains(digests[1])
    assert store.contains(digests[2])
    assert metrics.counters["evictions"] == 1
    assert store.size <= 35 * KIB


def test_an_object_with_an_open_reader_is_never_evicted(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, max_size=25 * KIB, clock=clock, small_object_size=0)
    old = put(store, b"a" * (10 * KIB))
    reader = store.open_object(old)
    assert reader is not None
    clock.advance(10)
    newer = put(store, b"b" * (10 * KIB))
    clock.advance(10)
    put(store, b"c" * (10 * KIB))
    assert store.contains(old)
    assert not store.contains(newer)
    assert reader.read(0, 3) == b"aaa"
    reader.close()


def test_size_bound_holds_within_a_few_percent_under_many_writes(tmp_path: Path) -> None:
    clock = FakeClock()
    bound = 200 * KIB
    store = make_store(tmp_path, max_size=bound, clock=clock)
    for i in range(300):
        clock.advance(1)
        data = i.to_bytes(4, "big") * (700 + (i * 37) % 900)
        digest = digest_of(data)
        pending = store.begin_write(digest)
        assert pending is not None
        for start in range(0, len(data), 1000):
            pending.write(data[start : start + 1000])
            assert store.size + store.pending_size <= bound * 1.03
        pending.commit().close()
        on_disk = sum(p.stat().st_size for p in (tmp_path / "blobs").rglob("*") if p.is_file())
        assert on_disk <= bound * 1.03


# Several processes.


def test_repository_membership_is_shared_between_processes(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    other = make_store(tmp_path)
    digest = digest_of(b"layer")
    assert not other.index.repository_holds("hub", "library/alpine", digest)
    store.index.record_repository_digest("hub", "library/alpine", digest)
    assert other.index.repository_holds("hub", "library/alpine", digest)
    assert not other.index.repository_holds("hub", "library/debian", digest)
    assert not other.index.repository_holds("gcr", "library/alpine", digest)


def test_tag_records_keep_the_digest_and_the_confirmation_time(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, clock=clock)
    index = store.index
    a, b = digest_of(b"a"), digest_of(b"b")
    index.record_tag("hub", "library/alpine", "latest", "index", a)
    index.record_tag("hub", "library/alpine", "latest", "v2", b)
    clock.advance(30)
    index.record_tag("hub", "library/alpine", "latest", "index", a)
    fresh = make_store(tmp_path)
    record = fresh.index.tag("hub", "library/alpine", "latest", "index")
    assert record is not None and record.digest == a and record.confirmed_at == clock.now
    other = fresh.index.tag("hub", "library/alpine", "latest", "v2")
    assert other is not None and other.digest == b
    assert fresh.index.tag("hub", "library/alpine", "3.20", "index") is None


def test_a_torn_tag_record_reads_as_unknown(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.index.record_tag("hub", "app", "latest", "", digest_of(b"a"))
    for path in (tmp_path / "index" / "tags").rglob("*"):
        if path.is_file() and path.name != ".name":
            path.write_bytes(b"")
    assert store.index.tag("hub", "app", "latest", "") is None


def test_rescan_adopts_objects_others_committed_and_forgets_those_they_evicted(
    tmp_path: Path,
) -> None:
    mine = make_store(tmp_path)
    other = make_store(tmp_path)
    kept = put(mine, b"k" * 5000)
    gone = put(mine, b"g" * 7000)
    theirs = put(other, b"t" * 3000)
    other.rescan()
    assert other._evict(gone.split(":")[1])
    mine.rescan()
    assert mine.objects == 2 and mine.size == 8000
    assert mine.contains(kept) and mine.contains(theirs) and not mine.contains(gone)


def test_start_removes_lock_files_nobody_holds(tmp_path: Path) -> None:
    store = make_store(tmp_path, small_object_size=0)
    digest = put(store, b"locked" * 100)
    obj = store.open_object(digest)
    assert obj is not None
    obj.close()
    orphan = tmp_path / "locks" / "ff" / ("ff" * 32 + ".lock")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"")
    report = CacheStore(str(tmp_path), max_size=1 << 30, fsync=False).start()
    assert not orphan.exists()
    assert report.lock_files_removed == 1  # only the orphan: the object's lock file stays
    assert report.objects == 1


def test_a_lock_file_replaced_while_locking_is_locked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locks = ProcessLocks(str(tmp_path))
    key = "ab" * 32
    real_lockf = fcntl.lockf
    swaps: list[str] = []

    def lockf_after_a_swap(fd: int, mode: int) -> None:
        if not swaps:
            # The previous holder releases (and removes the file) between our open and lock;
            # someone else creates a fresh one.
            path = locks.path(key)
            os.unlink(path)
            Path(path).write_bytes(b"")
            swaps.append(path)
        real_lockf(fd, mode)

    monkeypatch.setattr(fcntl, "lockf", lockf_after_a_swap)
    held = locks.exclusive(key)
    assert held is not None
    fd = locks._held[key].fd
    assert os.fstat(fd).st_ino == os.stat(locks.path(key)).st_ino
    held.release()
    assert not os.path.exists(locks.path(key))


def test_locks_inside_one_process_are_decided_by_the_process(tmp_path: Path) -> None:
    locks = ProcessLocks(str(tmp_path))
    key = "cd" * 32
    first = locks.shared(key)
    second = locks.shared(key)
    assert first is not None and second is not None
    assert locks.exclusive(key) is None  # fcntl alone would grant it to the same process
    first.release()
    assert locks.exclusive(key) is None
    second.release()
    writer = locks.exclusive(key)
    assert writer is not None
    assert locks.shared(key) is None
    writer.release()
    assert locks.shared(key) is not None


def test_a_corrupt_object_is_removed_even_while_read_and_can_be_fetched_again(
    tmp_path: Path,
) -> None:
    store = make_store(tmp_path)
    data = os.urandom(200 * KIB)
    digest = put(store, data)
    reader = store.open_object(digest)
    assert reader is not None
    path = store.object_path(digest.split(":")[1])
    stat = os.stat(path)
    with open(path, "r+b") as file:
        file.write(b"\0" * 8)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert store.verify() == [digest]
    assert not os.path.exists(path) and store.open_object(digest) is None
    put(store, data)  # fetched again, a new file
    reader.close()  # the old reader leaving does not disturb the new object's count
    fresh = store.open_object(digest)
    assert fresh is not None and fresh.read(0, fresh.size) == data
    fresh.close()
    assert all(entry.readers == 0 for entry in store._entries.values())
    assert store.size == len(data)


def test_background_verification_hashes_in_the_runner_and_discards_on_return(
    tmp_path: Path,
) -> None:
    store = make_store(tmp_path)
    bad = put(store, os.urandom(200 * KIB))
    good = put(store, os.urandom(200 * KIB))
    small = put(store, b"small")
    path = store.object_path(bad.split(":")[1])
    with open(path, "r+b") as file:
        file.write(b"\0" * 8)
    ran: list[Any] = []

    def runner(work: Any) -> Deferred[bool]:
        ran.append(work)
        return succeed(work())

    result: list[Any] = []
    Deferred.fromCoroutine(verify_in_background(store, runner)).addBoth(result.append)
    assert result == [[bad]]
    assert len(ran) == 2  # the large ones only
    assert not store.contains(bad) and store.contains(good) and store.contains(small)


# A volume that cannot be written: nothing raises at a request but StoreUnwritable.


def test_a_full_volume_fails_the_write_with_nothing_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = RecordingMetrics()
    store = make_store(tmp_path, metrics=metrics)
    volume = FailingVolume(monkeypatch, str(tmp_path))
    data = os.urandom(100 * KIB)
    digest = digest_of(data)
    pending = store.begin_write(digest)
    assert pending is not None
    volume.on = True
    with pytest.raises(StoreUnwritable) as raised:
        pending.write(data)
    assert isinstance(raised.value, OSError) and raised.value.errno == errno.ENOSPC
    assert files_under(tmp_path / "blobs") == []
    assert not store.writer_active(digest)  # the lock went with it
    assert store.pending_size == 0
    assert metrics.counters["store_write_errors"] == 1
    pending.abort()  # what a download does next: harmless


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EIO])
def test_a_failing_commit_leaves_nothing_half_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    store = make_store(tmp_path, fsync=True)
    volume = FailingVolume(monkeypatch, str(tmp_path), code)
    data = os.urandom(100 * KIB)
    pending = store.begin_write(digest_of(data))
    assert pending is not None
    pending.write(data)
    volume.on = True  # fsync and rename fail
    with pytest.raises(StoreUnwritable):
        pending.commit()
    volume.on = False
    assert files_under(tmp_path / "blobs") == []
    assert not store.writer_active(digest_of(data))
    assert store.open_object(digest_of(data)) is None and store.objects == 0


def test_a_failed_fsync_in_a_thread_is_reported_by_the_abort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = RecordingMetrics()
    store = make_store(tmp_path, fsync=True, metrics=metrics)
    volume = FailingVolume(monkeypatch, str(tmp_path), errno.EIO)
    pending = store.begin_write(digest_of(b"synced"))
    assert pending is not None
    pending.write(b"synced")
    volume.on = True
    with pytest.raises(StoreUnwritable):
        pending.sync()
    assert metrics.counters["store_write_errors"] == 0  # not counted from the thread...
    pending.abort()
    assert metrics.counters["store_write_errors"] == 1  # ...but back on the reactor
    assert files_under(tmp_path / "blobs") == []


def test_a_read_only_volume_refuses_begin_write_with_store_unwritable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path)
    volume = FailingVolume(monkeypatch, str(tmp_path), errno.EROFS)
    volume.on = True
    digest = digest_of(b"never stored")
    with pytest.raises(StoreUnwritable):
        store.begin_write(digest)
    assert not store.writer_active(digest)
    assert not store.contains(digest) and store.open_object(digest) is None


def test_a_vanished_cache_directory_is_a_miss_and_an_unwritable_store(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = make_store(root, small_object_size=0)
    digest = put(store, os.urandom(10 * KIB))
    shutil.rmtree(root)
    root.write_bytes(b"")  # and something else where it was: nothing can recreate it
    assert not store.contains(digest)
    assert store.open_object(digest) is None
    with pytest.raises(StoreUnwritable):
        store.begin_write(digest_of(b"new"))
    assert not store.writer_active(digest_of(b"new"))
    store.index.record_tag("hub", "app", "latest", "", digest)
    store.index.record_repository_digest("hub", "app", digest)
    store.index.record_media_type(digest, b"application/json")
    assert store.rescan() == 0 and store.objects == 0


def test_failures_are_logged_once_per_streak_and_writing_resumes_by_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = RecordingMetrics()
    store = make_store(tmp_path, metrics=metrics)
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(WriteFailures, "log", Logger(observer=events.append))
    volume = FailingVolume(monkeypatch, str(tmp_path))
    volume.on = True
    for i in range(5):
        pending = store.begin_write(digest_of(b"%d" % i))
        assert pending is not None
        with pytest.raises(StoreUnwritable):
            pending.write(b"%d" % i)
    assert metrics.counters["store_write_errors"] == 5
    assert [e["log_level"].name for e in events] == ["warn"]
    volume.on = False  # space came back: the next write simply works
    assert put(store, b"back") == digest_of(b"back")
    assert read(store, digest_of(b"back")) == b"back"
    volume.on = True
    pending = store.begin_write(digest_of(b"again"))
    assert pending is not None
    with pytest.raises(StoreUnwritable):
        pending.write(b"again")
    assert [e["log_level"].name for e in events] == ["warn", "info", "warn"]


# Large objects not hashed by this process.


def test_only_objects_hashed_here_are_verified(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    digest = put(store, os.urandom(100 * KIB))
    assert store.verified(digest)  # hashed as it was written
    fresh = make_store(tmp_path)
    assert not fresh.verified(digest)  # found on disk: only stat-ed
    obj = fresh.open_object(digest)
    assert obj is not None and not obj.verified
    obj.close()
    assert fresh.verify() == [] and fresh.verified(digest)


def test_read_verified_hashes_a_manifest_and_condemns_a_corrupt_one(tmp_path: Path) -> None:
    metrics = RecordingMetrics()
    data = os.urandom(100 * KIB)
    digest = put(make_store(tmp_path), data)
    store = make_store(tmp_path, metrics=metrics)
    with store.open_object(digest) as obj:  # type: ignore[union-attr]
        assert obj.read_verified(limit=64 * KIB) is None  # over the limit: not read
        assert obj.read_verified(limit=4 * 1024 * KIB) == data
    assert store.verified(digest)
    path = store.object_path(digest.split(":")[1])
    stat = os.stat(path)
    with open(path, "r+b") as file:
        file.write(b"\0\0")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = make_store(tmp_path, metrics=metrics)
    with again.open_object(digest) as obj:  # type: ignore[union-attr]
        assert obj.read_verified(limit=4 * 1024 * KIB) is None
    assert not os.path.exists(path) and metrics.counters["corrupt_objects"] == 1


def test_a_corrupt_object_that_cannot_be_removed_is_never_served_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(100 * KIB)
    digest = put(make_store(tmp_path), data)
    path = store_path = make_store(tmp_path).object_path(digest.split(":")[1])
    with open(store_path, "r+b") as file:
        file.write(b"\0\0")
    store = make_store(tmp_path)
    real_unlink = os.unlink

    def read_only(target: Any, *args: Any, **kwargs: Any) -> None:
        if str(target) == path:
            raise OSError(errno.EROFS, "read-only")
        real_unlink(target, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", read_only)
    obj = store.open_object(digest)
    assert obj is not None
    assert obj.read_verified(limit=1 << 30) is None
    obj.close()
    assert os.path.exists(path)  # it could not go...
    assert not store.contains(digest)  # ...but it is never a hit again
    assert store.open_object(digest) is None


def test_a_lookup_on_a_broken_volume_is_a_miss_reported_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = RecordingMetrics()
    store = make_store(tmp_path, metrics=metrics, small_object_size=0)
    digest = put(store, os.urandom(10 * KIB))
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(WriteFailures, "log", Logger(observer=events.append))
    shutil.rmtree(tmp_path / "locks")
    (tmp_path / "locks").write_bytes(b"")  # no read lock can be taken
    for _ in range(3):
        assert store.open_object(digest) is None
    assert metrics.counters["misses"] == 3
    assert len(events) == 1
