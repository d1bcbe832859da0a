"""The background scrub: every object re-hashed once per interval, spread out, in slices
through the runner; corrupt ones removed and counted, intact ones marked verified."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock

from regproxy.cache.metrics import RecordingMetrics
from regproxy.cache.scrub import Scrubber
from regproxy.cache.store import CacheStore, open_store

from .cache_helpers import digest_of

KIB = 1024


def make_store(root: Path, metrics: RecordingMetrics, clock: MemoryReactorClock) -> CacheStore:
    return open_store(
        str(root), max_size=1 << 30, fsync=False, metrics=metrics, clock=clock.seconds
    )


def put(store: CacheStore, data: bytes) -> str:
    digest = digest_of(data)
    pending = store.begin_write(digest)
    assert pending is not None
    pending.write(data)
    pending.commit().close()
    return digest


def corrupt(store: CacheStore, digest: str) -> None:
    path = store.object_path(digest.split(":")[1])
    stat = os.stat(path)
    with open(path, "r+b") as file:
        file.seek(stat.st_size // 2)
        file.write(b"\0\1\2\3")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


class Runner:
    """Records each slice of work; runs it at once, or holds it until ``release``."""

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.calls = 0
        self.held: list[tuple[Callable[[], int], Deferred[int]]] = []

    def __call__(self, work: Callable[[], int]) -> Deferred[int]:
        self.calls += 1
        if not self.hold:
            return succeed(work())
        waiting: Deferred[int] = Deferred()
        self.held.append((work, waiting))
        return waiting

    def release(self) -> None:
        work, waiting = self.held.pop(0)
        waiting.callback(work())


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


def restarted(tmp_path: Path, clock: MemoryReactorClock) -> tuple[CacheStore, RecordingMetrics]:
    metrics = RecordingMetrics()
    return make_store(tmp_path, metrics, clock), metrics


def test_a_pass_is_spread_over_the_interval(tmp_path: Path, clock: MemoryReactorClock) -> None:
    writer, _ = restarted(tmp_path, clock)
    for i in range(4):
        put(writer, bytes([i]) * (100 * KIB))
    store, metrics = restarted(tmp_path, clock)
    scrubber = Scrubber(store, clock, interval=400.0)
    scrubber.start()
    seen = []
    for _ in range(8):
        clock.advance(50)
        seen.append(metrics.counters["scrubbed_objects"])
    # One object every interval / 4 = 100 s: never a burst, all of them within the interval.
    assert seen == [0, 1, 1, 2, 2, 3, 3, 4]
    assert all(store.verified(d) for d in store.digests())
    scrubber.stop()
    assert clock.getDelayedCalls() == []


def test_a_corrupt_object_is_removed_and_counted_the_intact_kept(
    tmp_path: Path, clock: MemoryReactorClock
) -> None:
    writer, _ = restarted(tmp_path, clock)
    bad = put(writer, os.urandom(200 * KIB))
    good = put(writer, os.urandom(300 * KIB))
    corrupt(writer, bad)
    store, metrics = restarted(tmp_path, clock)
    scrubber = Scrubber(store, clock, interval=10.0)
    scrubber.start()
    clock.advance(5)
    clock.advance(5)
    assert metrics.counters["corrupt_objects"] == 1
    assert not os.path.exists(store.object_path(bad.split(":")[1]))
    assert not store.contains(bad)
    assert store.contains(good) and store.verified(good)
    scrubber.stop()


def test_hashing_runs_in_the_runner_one_slice_at_a_time(
    tmp_path: Path, clock: MemoryReactorClock
) -> None:
    store, metrics = restarted(tmp_path, clock)
    digest = put(store, os.urandom(200 * KIB))
    runner = Runner(hold=True)
    scrubber = Scrubber(store, clock, interval=1.0, runner=runner, slice_size=64 * KIB)
    scrubber.start()
    clock.advance(1)
    for expected in range(1, 5):  # 64 + 64 + 64 + 8 KiB, then the end of the file
        assert runner.calls == expected and len(runner.held) == 1
        # While it is hashed it is read: no eviction may take it.
        assert store._entries[digest.split(":")[1]].readers == 1
        runner.release()
    assert runner.calls == 5
    runner.release()
    assert metrics.counters["scrubbed_bytes"] == 200 * KIB
    assert store._entries[digest.split(":")[1]].readers == 0
    scrubber.stop()


def test_stopping_mid_object_waits_for_the_slice_and_applies_nothing(
    tmp_path: Path, clock: MemoryReactorClock
) -> None:
    writer, _ = restarted(tmp_path, clock)
    bad = put(writer, os.urandom(100 * KIB))
    corrupt(writer, bad)
    store, metrics = restarted(tmp_path, clock)
    runner = Runner(hold=True)
    scrubber = Scrubber(store, clock, interval=1.0, runner=runner)
    scrubber.start()
    clock.advance(1)
    stopped: list[Any] = []
    scrubber.stop().addCallback(stopped.append)
    assert stopped == []  # a slice is running in a thread: the file is still open
    runner.release()
    assert stopped == [None]
    assert store.contains(bad) and metrics.counters["corrupt_objects"] == 0
    assert clock.getDelayedCalls() == []


def test_each_pass_takes_in_objects_stored_since(
    tmp_path: Path, clock: MemoryReactorClock
) -> None:
    store, metrics = restarted(tmp_path, clock)
    scrubber = Scrubber(store, clock, interval=100.0)
    scrubber.start()
    clock.advance(100)  # an empty cache: nothing to do, check again in an interval
    assert metrics.counters["scrubbed_objects"] == 0
    digest = put(store, os.urandom(100 * KIB))
    corrupt(store, digest)  # rotted after its verified commit: only a scrub finds it
    clock.advance(100)
    clock.advance(100)
    assert metrics.counters["scrubbed_objects"] == 1
    assert not store.contains(digest)
    assert scrubber.passes >= 2
    scrubber.stop()


def test_an_object_being_evicted_is_skipped(tmp_path: Path, clock: MemoryReactorClock) -> None:
    store, metrics = restarted(tmp_path, clock)
    digest = put(store, os.urandom(100 * KIB))
    evicting = store._locks.exclusive(digest.split(":")[1])
    assert evicting is not None
    scrubber = Scrubber(store, clock, interval=10.0)
    scrubber.start()
    clock.advance(10)
    assert metrics.counters["scrubbed_objects"] == 0
    evicting.release()
    scrubber.stop()


def test_a_copy_put_in_place_while_hashing_is_never_removed(
    tmp_path: Path, clock: MemoryReactorClock
) -> None:
    writer, _ = restarted(tmp_path, clock)
    data = os.urandom(100 * KIB)
    digest = put(writer, data)
    corrupt(writer, digest)
    store, metrics = restarted(tmp_path, clock)
    runner = Runner(hold=True)
    scrubber = Scrubber(store, clock, interval=1.0, runner=runner)
    scrubber.start()
    clock.advance(1)
    # Meanwhile the corrupt file is replaced by a good one (another process's download).
    path = store.object_path(digest.split(":")[1])
    fresh = path + ".new"
    Path(fresh).write_bytes(data)
    os.rename(fresh, path)
    while runner.held:
        runner.release()
    assert metrics.counters["corrupt_objects"] == 1
    assert Path(path).read_bytes() == data
    scrubber.stop()
