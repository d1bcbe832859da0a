"""Reading along a download another process writes into the same cache directory, in memory:
two stores on one directory stand for two processes (the writer's and ours), a fake clock
drives the polling, and the writer's liveness (its download lock, which fcntl cannot tell
apart inside one process) is a flag the test sets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from regproxy.cache.download import Download, DownloadFailed, Downloads
from regproxy.cache.metrics import RecordingMetrics
from regproxy.cache.progress import progress_path, publish, read_progress
from regproxy.cache.store import DigestMismatch, open_store
from regproxy.cache.tail import Announcement, RemoteDownload, RemoteDownloads, WriterLost

from .cache_helpers import FakeClock, digest_of
from .test_download import BLOB, PARTS, outcome

DIGEST = digest_of(BLOB)
TYPE = (b"content-type", b"application/vnd.oci.image.layer.v1.tar")


class Process:
    """One process's view of the cache directory: its store and its downloads."""

    def __init__(self, root: Path, reactor: MemoryReactorClock) -> None:
        self.metrics = RecordingMetrics()
        self.store = open_store(
            str(root), max_size=1 << 30, clock=FakeClock(), fsync=False, metrics=self.metrics
        )
        self.downloads = Downloads(self.store, clock=reactor)


class World:
    def __init__(self, root: Path) -> None:
        self.reactor = MemoryReactorClock()
        self.writer = Process(root, self.reactor)
        self.reader = Process(root, self.reactor)
        self.others = Process(root, self.reactor)  # a third process, to take over
        self.writer_alive = True
        self.remote = RemoteDownloads(
            self.reader.store,
            self.reader.downloads,
            clock=self.reactor,
            writer_active=self.lock_held,
            lost_timeout=5.0,
        )

    def lock_held(self, digest: str) -> bool:
        return (
            self.writer_alive
            or self.reader.downloads.get(digest) is not None
            or self.others.downloads.get(digest) is not None
        )

    def start(self, size: int | None = len(BLOB), *, announce: bool = True) -> Download:
        download = self.writer.downloads.start(DIGEST)
        assert download is not None
        if announce:
            download.announce(size, [TYPE])
        return download

    def find(self) -> RemoteDownload:
        remote = self.remote.find(DIGEST)
        assert remote is not None
        return remote

    def tick(self, seconds: float = 0.1) -> None:
        self.reactor.advance(0)
        self.reactor.advance(seconds)
        self.reactor.advance(0)


@pytest.fixture
def w(tmp_path: Path) -> World:
    return World(tmp_path)


def attach(
    remote: RemoteDownload, first: int = 0, last: int | None = None, refetch: Any = None
) -> tuple[Any, StringTransport, list[Any]]:
    consumer = StringTransport()
    reader = remote.attach(consumer, first, last, refetch=refetch)
    return reader, consumer, outcome(reader.done)


def test_a_reader_elsewhere_gets_bytes_as_they_reach_the_file(w: World) -> None:
    download = w.start()
    remote = w.find()
    announced = outcome(remote.when_announced())
    w.tick()
    assert announced == [Announcement(len(BLOB), (TYPE,))]
    _, consumer, done = attach(remote)
    for part in PARTS[:10]:
        download.write(part)
    w.tick()
    assert consumer.value() == BLOB[:100_000]
    for part in PARTS[10:]:
        download.write(part)
    w.tick()
    # The whole file is there and hashes right: released even before the writer commits.
    assert consumer.value() == BLOB and done == [len(BLOB)]
    download.finish()
    assert w.reader.metrics.counters["remote_readers"] == 1
    assert w.reader.metrics.counters["bytes_from_upstream"] == 0
    w.tick(1)
    assert len(w.remote) == 0


def test_the_last_byte_waits_for_the_whole_file_to_hash_right(w: World) -> None:
    download = w.start()
    remote = w.find()
    w.tick()
    _, whole, whole_done = attach(remote)
    _, ranged, ranged_done = attach(remote, 0, 99)
    corrupt = BLOB[:-1] + bytes([(BLOB[-1] + 1) % 256])
    chunks = [corrupt[i : i + 10_000] for i in range(0, len(corrupt), 10_000)]
    for chunk in chunks[:-1]:
        download.write(chunk)
    w.tick()
    assert ranged.value() == BLOB[:99] and ranged_done == []  # its range is there, unverified
    download.write(chunks[-1])
    w.tick()
    assert whole_done[0].check(DigestMismatch) and ranged_done[0].check(DigestMismatch)
    assert len(whole.value()) < len(BLOB) and len(ranged.value()) < 100


def test_a_range_elsewhere_is_completed_once_verified(w: World) -> None:
    download = w.start()
    remote = w.find()
    w.tick()
    _, ranged, done = attach(remote, 20_000, 20_099)
    for part in PARTS:
        download.write(part)
    w.tick()
    assert ranged.value() == BLOB[20_000:20_100] and done == [100]


def test_announcement_waits_for_the_upstream_headers(w: World) -> None:
    download = w.start(announce=False)
    remote = w.find()
    announced = outcome(remote.when_announced())
    w.tick(1)
    assert announced == []
    download.announce(None, [TYPE])
    w.tick()
    assert announced == [Announcement(None, (TYPE,))]
    _, consumer, done = attach(remote)
    for part in PARTS:
        download.write(part)
    w.tick()
    # No size announced: the end is known (and the last byte released) at the commit.
    assert consumer.value() == BLOB[:-1] and done == []
    download.finish()
    w.tick()
    assert consumer.value() == BLOB and done == [len(BLOB)]


def test_a_writer_refused_before_announcing_sends_each_request_its_own_way(w: World) -> None:
    download = w.start(announce=False)
    remote = w.find()
    announced = outcome(remote.when_announced())
    download.fail(Failure(DownloadFailed("401 upstream")))
    w.writer_alive = False
    w.tick()
    assert announced[0].check(WriterLost)
    assert w.remote.find(DIGEST) is None


def test_a_paused_reader_elsewhere_gets_nothing_until_resumed(w: World) -> None:
    download = w.start()
    remote = w.find()
    w.tick()
    reader, consumer, done = attach(remote)
    download.write(PARTS[0])
    w.tick()
    reader.pauseProducing()
    for part in PARTS[1:]:
        download.write(part)
    w.tick()
    assert consumer.value() == PARTS[0]
    reader.resumeProducing()
    assert consumer.value() == BLOB and done == [len(BLOB)]


def test_nothing_to_follow(w: World) -> None:
    w.writer_alive = False
    assert w.remote.find(DIGEST) is None  # nobody downloads it
    download = w.writer.downloads.start(DIGEST)
    assert download is not None
    w.writer_alive = True
    # This process downloads it itself: attach there.
    mine = w.reader.downloads.start(DIGEST)
    assert mine is not None
    assert w.remote.find(DIGEST) is None
    for part in PARTS:
        mine.write(part)
    mine.finish()
    assert w.remote.find(DIGEST) is None  # stored
    download.fail(Failure(DownloadFailed("done with it")))


def feed(download: Download, data: bytes = BLOB) -> None:
    download.announce(len(data), [TYPE])
    for i in range(0, len(data), 10_000):
        download.write(data[i : i + 10_000])
    download.finish()


def test_when_the_writer_dies_one_reader_here_takes_over(w: World) -> None:
    dead = w.start()
    remote = w.find()
    w.tick()
    taken: list[Download] = []
    _, first, first_done = attach(remote, refetch=taken.append)
    _, second, second_done = attach(remote, refetch=taken.append)
    for part in PARTS[:12]:
        dead.write(part)
    w.tick()
    assert first.value() == BLOB[:120_000]
    w.writer_alive = False  # killed: its lock is free, its file stays short
    w.tick(1)
    assert len(taken) == 1  # one fetch for both readers
    assert w.reader.downloads.get(DIGEST) is taken[0]
    assert w.reader.metrics.counters["takeovers"] == 1
    feed(taken[0])
    w.tick()
    assert first.value() == second.value() == BLOB
    assert first_done == second_done == [len(BLOB)]
    assert w.reader.store.contains(DIGEST)
    dead.fail(Failure(DownloadFailed("the test is over")))


def test_when_the_writer_dies_readers_follow_another_process_that_took_over(w: World) -> None:
    dead = w.start()
    remote = w.find()
    w.tick()
    _, consumer, done = attach(remote)  # no refetch: this request can only follow
    for part in PARTS[:12]:
        dead.write(part)
    w.tick()
    w.writer_alive = False
    w.tick(1)
    assert w.reader.downloads.get(DIGEST) is None
    taker = w.others.downloads.start(DIGEST)
    assert taker is not None
    taker.announce(len(BLOB), [TYPE])
    w.tick(1)
    for part in PARTS:
        taker.write(part)
    w.tick()
    assert consumer.value() == BLOB and done == [len(BLOB)]
    taker.finish()
    dead.fail(Failure(DownloadFailed("the test is over")))


def test_bytes_after_a_takeover_are_verified_too(w: World) -> None:
    dead = w.start()
    remote = w.find()
    w.tick()
    taken: list[Download] = []
    _, consumer, done = attach(remote, refetch=taken.append)
    for part in PARTS[:12]:
        dead.write(part)
    w.tick()
    w.writer_alive = False
    w.tick(1)
    wrong = BLOB[:-1] + b"\0" if BLOB[-1] else BLOB[:-1] + b"\1"
    for i in range(0, len(wrong), 10_000):
        taken[0].write(wrong[i : i + 10_000])
    w.tick()
    assert done[0].check(DigestMismatch) and len(consumer.value()) < len(BLOB)
    taken[0].finish()
    dead.fail(Failure(DownloadFailed("the test is over")))


def test_when_nobody_takes_over_readers_fail_in_time(w: World) -> None:
    dead = w.start()
    remote = w.find()
    w.tick()
    _, consumer, done = attach(remote)
    dead.write(PARTS[0])
    w.tick()
    w.writer_alive = False
    w.tick(1)
    assert done == []
    for _ in range(60):
        w.tick()
    assert done[0].check(WriterLost) and len(consumer.value()) < len(BLOB)
    assert len(w.remote) == 0
    dead.fail(Failure(DownloadFailed("the test is over")))


def test_a_writer_that_finishes_between_two_checks_is_not_taken_over(w: World) -> None:
    download = w.start()
    remote = w.find()
    w.tick()
    taken: list[Download] = []
    _, consumer, done = attach(remote, refetch=taken.append)
    for part in PARTS:
        download.write(part)
    download.finish()  # committed; no tick in between
    w.writer_alive = False
    w.tick(1)
    assert taken == [] and done == [len(BLOB)] and consumer.value() == BLOB


def test_a_stale_progress_file_is_withdrawn_by_the_next_writer(w: World, tmp_path: Path) -> None:
    object_path = w.writer.store.object_path(DIGEST.split(":")[1])
    os.makedirs(os.path.dirname(object_path), exist_ok=True)
    publish(object_path, object_path + "-gone", len(BLOB))
    assert read_progress(object_path) is None  # not a temporary file of this object
    stale = os.path.join(os.path.dirname(object_path), f".tmp-{os.path.basename(object_path)}-1")
    publish(object_path, stale, len(BLOB))
    assert read_progress(object_path) is not None
    download = w.start(announce=False)
    assert read_progress(object_path) is None
    download.announce(len(BLOB), [TYPE])
    progress = read_progress(object_path)
    assert progress is not None and progress.temp_path == download.temp_path
    assert progress.headers == (TYPE,) and progress.size == len(BLOB)
    download.fail(Failure(DownloadFailed("over")))
    assert not os.path.exists(progress_path(object_path))


def test_a_committed_download_leaves_no_progress_file(w: World) -> None:
    download = w.start()
    feed_rest = PARTS
    for part in feed_rest:
        download.write(part)
    download.finish()
    object_path = w.writer.store.object_path(DIGEST.split(":")[1])
    assert not os.path.exists(progress_path(object_path))


def test_after_a_takeover_each_byte_comes_from_the_file_it_was_hashed_from(w: World) -> None:
    dead = w.start()
    remote = w.find()
    w.tick()
    taken: list[Download] = []
    slow, consumer, done = attach(remote, refetch=taken.append)
    slow.pauseProducing()  # has nothing yet
    for part in PARTS[:12]:
        dead.write(part)
    w.tick()
    w.writer_alive = False
    w.tick(1)
    # The new file differs where the old one was hashed already: those bytes must never be
    # served from it (the hash would not see them).
    forged = b"\xff" * 120_000 + BLOB[120_000:]
    for i in range(0, len(forged), 10_000):
        taken[0].write(forged[i : i + 10_000])
    w.tick()
    slow.resumeProducing()
    assert consumer.value() == BLOB and done == [len(BLOB)]
    taken[0].fail(Failure(DownloadFailed("the test is over")))
    dead.fail(Failure(DownloadFailed("the test is over")))


def test_following_leaves_no_descriptor_open(w: World) -> None:
    before = len(os.listdir("/proc/self/fd"))
    dead = w.start()
    remote = w.find()
    w.tick()
    taken: list[Download] = []
    _, _, done = attach(remote, refetch=taken.append)
    dead.write(PARTS[0])
    w.tick()
    w.writer_alive = False
    w.tick(1)
    dead.fail(Failure(DownloadFailed("killed")))
    feed(taken[0])
    w.tick()
    assert done == [len(BLOB)]
    w.tick(2)
    assert len(w.remote) == 0 and len(w.reader.downloads) == 0
    assert len(os.listdir("/proc/self/fd")) == before
