"""The store shared by real processes: download locks, a killed writer, readers that
keep an object from eviction, racing downloads."""

from __future__ import annotations

from pathlib import Path

from tests.unit.cache.cache_helpers import FakeClock, digest_of
from tests.unit.cache.test_store import KIB, files_under, make_store, put, read

from .cache_processes import Helper

HOLD_PENDING = """
from regproxy.cache.store import open_store
store = open_store(sys.argv[1], max_size=1 << 30, fsync=False)
pending = store.begin_write(sys.argv[2])
print("writing" if pending is not None else "busy", flush=True)
pending.write(b"par")
print("wrote", flush=True)
sys.stdin.readline()
pending.write(b"tial")
pending.commit().close()
print("committed", flush=True)
"""

HOLD_READER = """
from regproxy.cache.store import open_store
store = open_store(sys.argv[1], max_size=1 << 30, fsync=False, small_object_size=0)
obj = store.open_object(sys.argv[2])
print("reading" if obj is not None else "miss", flush=True)
sys.stdin.readline()
print(obj.read(0, obj.size).decode(), flush=True)
"""


def test_another_process_download_blocks_ours_until_it_commits(tmp_path: Path) -> None:
    make_store(tmp_path)
    digest = digest_of(b"partial")
    helper = Helper(HOLD_PENDING, str(tmp_path), digest)
    try:
        helper.expect("wrote")
        store = make_store(tmp_path)
        assert store.begin_write(digest) is None
        assert store.writer_active(digest)
        assert store.open_object(digest) is None  # never the partial file
        assert store.objects == 0  # its temporary file was neither adopted nor removed
        helper.send("go")
        helper.expect("committed")
        assert not store.writer_active(digest)
        assert read(store, digest) == b"partial"
    finally:
        helper.stop()


def test_a_killed_writer_frees_the_digest_and_leaves_nothing_served(tmp_path: Path) -> None:
    make_store(tmp_path)
    digest = digest_of(b"partial")
    helper = Helper(HOLD_PENDING, str(tmp_path), digest)
    try:
        helper.expect("wrote")
        helper.kill()  # kill -9 mid-download
        store = make_store(tmp_path)
        assert not store.writer_active(digest)
        assert store.open_object(digest) is None
        assert files_under(tmp_path / "blobs") == []
        pending = store.begin_write(digest)
        assert pending is not None
        pending.write(b"partial")
        pending.commit().close()
        assert read(store, digest) == b"partial"
    finally:
        helper.stop()


def test_an_object_read_by_another_process_is_not_evicted(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, max_size=25 * KIB, clock=clock, small_object_size=0)
    data = b"r" * (10 * KIB)
    digest = put(store, data)
    helper = Helper(HOLD_READER, str(tmp_path), digest)
    try:
        helper.expect("reading")
        clock.advance(10)
        newer = put(store, b"n" * (10 * KIB))
        clock.advance(10)
        put(store, b"m" * (10 * KIB))
        assert store.contains(digest)
        assert not store.contains(newer)
        helper.send("go")
        helper.expect(data.decode())
        assert helper.wait() == 0
        # Once the reader is gone it can go too.
        clock.advance(10)
        put(store, b"o" * (10 * KIB))
        assert not store.contains(digest)
    finally:
        helper.stop()


RACE = """
import time
from regproxy.cache.store import open_store
store = open_store(sys.argv[1], max_size=1 << 30, fsync=False)
data = sys.argv[3].encode() * 400000
print("ready", flush=True)
sys.stdin.readline()
deadline = time.monotonic() + 30
downloads = 0
while time.monotonic() < deadline:
    obj = store.open_object(sys.argv[2])
    if obj is not None:
        assert obj.read(0, obj.size) == data, "read a wrong or partial object"
        obj.close()
        break
    pending = store.begin_write(sys.argv[2])
    if pending is None:
        time.sleep(0.01)
        continue
    downloads += 1
    for start in range(0, len(data), 4096):
        pending.write(data[start:start + 4096])
        time.sleep(0.005)
    pending.commit().close()
print("downloads", downloads, flush=True)
print("done", flush=True)
"""


def test_processes_racing_for_one_digest_download_it_once(tmp_path: Path) -> None:
    make_store(tmp_path)
    data = b"q" * 400000
    digest = digest_of(data)
    helpers = [Helper(RACE, str(tmp_path), digest, "q") for _ in range(4)]
    try:
        for helper in helpers:
            helper.expect("ready")
        for helper in helpers:
            helper.send("go")
        outputs = []
        for helper in helpers:
            helper.expect("done", timeout=60)
            outputs.append(helper.lines[-2])
        assert sorted(outputs) == ["downloads 0"] * 3 + ["downloads 1"]
    finally:
        for helper in helpers:
            helper.stop()


# The index.
