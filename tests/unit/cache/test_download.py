"""Downloads in progress: many readers on one upstream transfer, each at its own pace, never
handed the last byte of a body before its digest is checked. In memory (MemoryReactorClock,
StringTransport consumers) on a real store in a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from regproxy.cache.download import (
    Abandoned,
    Download,
    DownloadFailed,
    DownloadProtocol,
    DownloadReader,
    Downloads,
    ReaderStopped,
    WrongLength,
)
from regproxy.cache.metrics import RecordingMetrics
from regproxy.cache.store import DigestMismatch, open_store
from tests.support.waiting import eventually

from .cache_helpers import FakeClock, digest_of

BLOB = bytes(range(256)) * 1024  # 256 KiB, several read chunks
PARTS = [BLOB[i : i + 10_000] for i in range(0, len(BLOB), 10_000)]


class Harness:
    def __init__(self, root: Path, **store_kwargs: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.metrics = RecordingMetrics()
        store_kwargs.setdefault("max_size", 64 * 1024 * 1024)
        self.store = open_store(
            str(root), clock=FakeClock(), fsync=False, metrics=self.metrics, **store_kwargs
        )
        self.downloads = Downloads(self.store, clock=self.reactor, orphan_limit=100_000)

    def start(self, data: bytes = BLOB, expected_size: int | None = None) -> Download:
        download = self.downloads.start(digest_of(data), expected_size)
        assert download is not None
        return download


def outcome(d: Deferred[Any]) -> list[Any]:
    """What a Deferred fired with so far: [] nothing, [value], or [Failure]."""
    results: list[Any] = []
    d.addBoth(results.append)
    return results


def reader_on(
    download: Download, first: int = 0, last: int | None = None
) -> tuple[DownloadReader, StringTransport, list[Any]]:
    consumer = StringTransport()
    reader = download.attach(consumer, first, last)
    return reader, consumer, outcome(reader.done)


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_readers_get_bytes_as_the_writer_writes_them(h: Harness) -> None:
    download = h.start()
    _, first, first_done = reader_on(download)
    _, second, second_done = reader_on(download)
    download.write(PARTS[0])
    # No clock tick, no disk polling: the write itself delivered them (all but the last byte).
    assert first.value() == second.value() == PARTS[0][:-1]
    for part in PARTS[1:]:
        download.write(part)
    assert first.value() == BLOB[:-1]
    assert first_done == [] and second_done == []
    done = outcome(download.done)
    download.finish()
    assert first.value() == second.value() == BLOB
    assert first_done == second_done == [len(BLOB)]
    assert done == [True]
    assert first.producer is None  # unregistered before done fired
    stored = h.store.open_object(digest_of(BLOB))
    assert stored is not None and stored.read(0, stored.size) == BLOB
    stored.close()
    assert h.metrics.counters["coalesced_readers"] == 1
    assert h.metrics.counters["bytes_from_upstream"] == len(BLOB)
    assert len(h.downloads) == 0


def test_a_late_reader_catches_up_from_the_file_then_follows(h: Harness) -> None:
    download = h.start()
    for part in PARTS[:10]:
        download.write(part)
    _, late, late_done = reader_on(download)
    assert late.value() == b"".join(PARTS[:10])[:-1]
    for part in PARTS[10:]:
        download.write(part)
    download.finish()
    assert late.value() == BLOB and late_done == [len(BLOB)]


def test_a_paused_reader_slows_nobody_and_catches_up_later(h: Harness) -> None:
    download = h.start()
    slow, slow_consumer, slow_done = reader_on(download)
    _, fast, fast_done = reader_on(download)
    download.write(PARTS[0])
    slow.pauseProducing()
    for part in PARTS[1:]:
        download.write(part)
    download.finish()
    assert fast.value() == BLOB and fast_done == [len(BLOB)]
    assert download.done.called
    assert slow_consumer.value() == PARTS[0][:-1] and slow_done == []
    slow.resumeProducing()
    assert slow_consumer.value() == BLOB and slow_done == [len(BLOB)]


def test_a_reader_pausing_from_inside_write_gets_no_more_until_resumed(h: Harness) -> None:
    download = h.start()
    consumer = StringTransport()
    writes: list[int] = []
    original = consumer.write

    def write_then_pause(data: bytes) -> None:
        original(data)
        writes.append(len(data))
        reader.pauseProducing()  # what a full socket buffer does

    consumer.write = write_then_pause  # type: ignore[method-assign]
    reader = download.attach(consumer)
    for part in PARTS:
        download.write(part)
    download.finish()
    assert len(writes) == 1
    while len(consumer.value()) < len(BLOB):
        before = len(consumer.value())
        reader.resumeProducing()
        assert len(consumer.value()) > before
    assert consumer.value() == BLOB


def test_wrong_bytes_fail_every_reader_before_its_last_byte(h: Harness) -> None:
    download = h.start()
    _, whole, whole_done = reader_on(download)
    _, ranged, ranged_done = reader_on(download, 100, 199)
    corrupt = BLOB[:-5] + b"XXXXX"
    for i in range(0, len(corrupt), 10_000):
        download.write(corrupt[i : i + 10_000])
    done = outcome(download.done)
    download.finish()
    assert len(whole.value()) < len(BLOB)
    assert len(ranged.value()) < 100
    assert whole_done[0].check(DigestMismatch) and ranged_done[0].check(DigestMismatch)
    assert done == [False] and download.failure is not None
    assert download.failure.check(DigestMismatch)
    assert h.store.open_object(digest_of(BLOB)) is None
    assert [p for p in Path(h.store.blobs_dir).rglob("*") if p.is_file()] == []
    assert h.metrics.counters["digest_mismatches"] == 1


def test_a_range_is_served_as_it_arrives_and_completed_once_verified(h: Harness) -> None:
    download = h.start(expected_size=len(BLOB))
    _, ranged, ranged_done = reader_on(download, 20_000, 20_099)
    _, tail, tail_done = reader_on(download, len(BLOB) - 10)
    for part in PARTS[:3]:
        download.write(part)
    assert ranged.value() == BLOB[20_000:20_099]  # all but its last byte
    assert tail.value() == b""
    for part in PARTS[3:]:
        download.write(part)
    assert tail.value() == BLOB[-10:-1]
    download.finish()
    assert ranged.value() == BLOB[20_000:20_100] and ranged_done == [100]
    assert tail.value() == BLOB[-10:] and tail_done == [10]


def test_a_range_past_the_end_is_cut_to_the_object(h: Harness) -> None:
    download = h.start()
    _, consumer, done = reader_on(download, len(BLOB) - 4, len(BLOB) + 100)
    for part in PARTS:
        download.write(part)
    download.finish()
    assert consumer.value() == BLOB[-4:] and done == [4]


def test_a_reader_leaving_does_not_stop_the_download_for_others(h: Harness) -> None:
    download = h.start(expected_size=len(BLOB))
    stopped: list[bool] = []
    download.stop_upstream = lambda: stopped.append(True)
    leaving, _, leaving_done = reader_on(download)
    _, staying, staying_done = reader_on(download)
    download.write(PARTS[0])
    leaving.stopProducing()
    assert leaving_done[0].check(ReaderStopped)
    for part in PARTS[1:]:
        download.write(part)
    download.finish()
    assert staying.value() == BLOB and staying_done == [len(BLOB)]
    assert stopped == []


def test_without_readers_a_download_that_is_nearly_done_completes(h: Harness) -> None:
    download = h.start(expected_size=len(BLOB))
    reader, _, _ = reader_on(download)
    for part in PARTS[:-5]:  # 50 000 bytes left, under the 100 000 limit
        download.write(part)
    reader.stopProducing()
    for part in PARTS[-5:]:
        download.write(part)
    done = outcome(download.done)
    download.finish()
    assert done == [True]
    assert h.store.contains(digest_of(BLOB))


def test_without_readers_a_download_with_much_left_stops_the_upstream(h: Harness) -> None:
    download = h.start(expected_size=len(BLOB))
    stopped: list[bool] = []
    download.stop_upstream = lambda: stopped.append(True)
    reader, _, _ = reader_on(download)
    download.write(PARTS[0])
    done = outcome(download.done)
    reader.stopProducing()
    assert stopped == [True]
    assert done == [False] and download.failure is not None
    assert download.failure.check(Abandoned)
    download.write(PARTS[1])  # late bytes from the upstream are ignored
    download.finish()
    assert not h.store.contains(digest_of(BLOB))
    assert len(h.downloads) == 0
    assert h.store.begin_write(digest_of(BLOB)) is not None  # the lock was released


def test_without_readers_an_unknown_length_download_fetches_at_most_the_limit(
    h: Harness,
) -> None:
    download = h.start()
    stopped: list[bool] = []
    download.stop_upstream = lambda: stopped.append(True)
    reader, _, _ = reader_on(download)
    download.write(PARTS[0])
    done = outcome(download.done)
    reader.stopProducing()
    for part in PARTS[1:11]:  # exactly the 100 000 bytes allowed
        download.write(part)
    assert stopped == []
    download.write(PARTS[11])
    assert stopped == [True]
    assert done == [False] and download.failure is not None
    assert download.failure.check(Abandoned)


def test_an_upstream_failure_fails_readers_and_keeps_nothing(h: Harness) -> None:
    download = h.start()
    _, consumer, done = reader_on(download)
    download.write(PARTS[0])
    download.fail(Failure(ConnectionLost()))
    assert done[0].check(DownloadFailed)
    assert consumer.value() == PARTS[0][:-1]
    assert [p for p in Path(h.store.blobs_dir).rglob("*") if p.is_file()] == []
    # A reader arriving after the failure is failed at once.
    with pytest.raises(ValueError):
        download.attach(StringTransport())


def test_more_or_fewer_bytes_than_announced_is_a_failure(h: Harness) -> None:
    download = h.start(expected_size=len(BLOB))
    _, _, done = reader_on(download)
    for part in PARTS[:-1]:
        download.write(part)
    download.finish()
    assert done[0].check(WrongLength)

    other = h.start(BLOB[:100], expected_size=50)
    _, _, other_done = reader_on(other)
    other.write(BLOB[:100])
    assert other_done[0].check(WrongLength)


def test_the_empty_blob_is_served_and_stored(h: Harness) -> None:
    download = h.start(b"")
    _, consumer, done = reader_on(download)
    download.finish()
    assert done == [0] and consumer.value() == b""
    assert h.store.contains(digest_of(b""))


def test_a_reader_after_completion_gets_everything_at_once_while_others_read(
    h: Harness,
) -> None:
    download = h.start()
    slow, _, _ = reader_on(download)
    slow.pauseProducing()  # keeps the download alive after it finished
    for part in PARTS:
        download.write(part)
    download.finish()
    _, late, late_done = reader_on(download)
    assert late.value() == BLOB and late_done == [len(BLOB)]


def test_one_download_per_digest(h: Harness) -> None:
    download = h.start()
    assert h.downloads.get(digest_of(BLOB)) is download
    with pytest.raises(ValueError):
        h.downloads.start(digest_of(BLOB))


def test_an_object_larger_than_the_cache_is_not_downloaded_into_it(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_size=1000)
    assert h.downloads.start(digest_of(BLOB), expected_size=len(BLOB)) is None


def test_the_fsync_runs_through_the_injected_runner(tmp_path: Path) -> None:
    store = open_store(str(tmp_path), max_size=1 << 30, clock=FakeClock(), fsync=True)
    ran: list[str] = []
    later: Deferred[None] = Deferred()

    def runner(work: Any) -> Deferred[None]:
        ran.append(work.__name__)
        work()
        return later

    downloads = Downloads(store, clock=MemoryReactorClock(), run_blocking=runner)
    download = downloads.start(digest_of(BLOB))
    assert download is not None
    _, consumer, done = reader_on(download)
    for part in PARTS:
        download.write(part)
    download.finish()
    # Readers have everything once verified, before the fsync is over.
    assert consumer.value() == BLOB and done == [len(BLOB)]
    assert ran == ["sync"] and not store.contains(digest_of(BLOB))
    later.callback(None)
    assert store.contains(digest_of(BLOB))


# The IProtocol adapter.


class BodyTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


@pytest.mark.parametrize("end", [ResponseDone(), PotentialDataLoss()])
def test_protocol_finishes_the_download_when_the_body_ends(h: Harness, end: Exception) -> None:
    download = h.start()
    protocol = DownloadProtocol(download)
    protocol.makeConnection(BodyTransport())
    _, consumer, done = reader_on(download)
    for part in PARTS:
        protocol.dataReceived(part)
    protocol.connectionLost(Failure(end))
    assert consumer.value() == BLOB and done == [len(BLOB)]


def test_protocol_fails_the_download_when_the_body_breaks(h: Harness) -> None:
    download = h.start()
    protocol = DownloadProtocol(download)
    protocol.makeConnection(BodyTransport())
    _, _, done = reader_on(download)
    protocol.dataReceived(PARTS[0])
    protocol.connectionLost(Failure(ConnectionLost()))
    assert done[0].check(DownloadFailed)


def test_protocol_lets_an_abandoned_download_stop_the_body_transfer(h: Harness) -> None:
    download = h.start(expected_size=len(BLOB))
    protocol = DownloadProtocol(download)
    transport = BodyTransport()
    protocol.makeConnection(transport)
    reader, _, _ = reader_on(download)
    protocol.dataReceived(PARTS[0])
    reader.stopProducing()
    assert transport.stopped


# Waiting for another process.

HOLD_PENDING = """
from regproxy.cache.store import open_store
store = open_store(sys.argv[1], max_size=1 << 30, fsync=False)
pending = store.begin_write(sys.argv[2])
pending.write(b"par")
print("wrote", flush=True)
if sys.stdin.readline().strip() == "commit":
    pending.write(b"tial")
    pending.commit().close()
    print("committed", flush=True)
sys.stdin.readline()
"""


def settle(reactor: MemoryReactorClock, result: list[Any], seconds: float = 30.0) -> None:
    """Advance the fake clock while the helper process works (a deadline in real time)."""
    eventually(lambda: reactor.advance(0.05) or result, seconds, 0.01, what="the wait's outcome")


def test_fd_count_returns_to_start_after_downloads(h: Harness) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for n in range(3):
        data = bytes([n]) * 70_000
        download = h.start(data)
        for _ in range(3):
            reader_on(download)
        download.write(data)
        download.finish()
    assert len(os.listdir("/proc/self/fd")) == before
    assert len(h.downloads) == 0


# Announcing the size once the upstream's headers arrive.


def test_readers_can_wait_for_the_upstream_headers(h: Harness) -> None:
    download = h.start()  # the lock is taken before the upstream request goes out
    sizes = outcome(download.when_announced())
    _, ranged, ranged_done = reader_on(download, 0, 99)
    assert sizes == []
    assert download.announce(len(BLOB)) is True
    assert sizes == [len(BLOB)]
    assert outcome(download.when_announced()) == [len(BLOB)]
    download.write(PARTS[0])
    assert ranged.value() == BLOB[:99]
    for part in PARTS[1:]:
        download.write(part)
    download.finish()
    assert ranged_done == [100]


def test_a_failure_before_the_headers_fails_the_waiters(h: Harness) -> None:
    download = h.start()
    sizes = outcome(download.when_announced())
    outcome(download.done)
    download.fail(Failure(ConnectionLost()))
    assert sizes[0].check(DownloadFailed)
    assert outcome(download.when_announced())[0].check(DownloadFailed)


def test_an_object_announced_larger_than_the_cache_streams_without_evicting(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, max_size=200_000)
    small = h.start(b"kept" * 1000)
    small.write(b"kept" * 1000)
    small.finish()
    download = h.start()
    _, consumer, done = reader_on(download)
    assert download.announce(len(BLOB)) is False
    for part in PARTS:
        download.write(part)
        assert h.store.pending_size == 0
    committed = outcome(download.done)
    download.finish()
    assert consumer.value() == BLOB and done == [len(BLOB)]
    assert committed == [False]
    assert not h.store.contains(digest_of(BLOB))
    assert h.store.contains(digest_of(b"kept" * 1000))


def test_a_broken_consumer_fails_its_reader_alone(h: Harness) -> None:
    download = h.start()
    broken = StringTransport()

    def explode(data: bytes) -> None:
        raise RuntimeError("the request is gone")

    broken.write = explode  # type: ignore[method-assign]
    broken_reader = download.attach(broken)
    broken_done = outcome(broken_reader.done)
    _, healthy, healthy_done = reader_on(download)
    for part in PARTS:
        download.write(part)  # never raises into the upstream protocol
    download.finish()
    assert broken_done[0].check(RuntimeError)
    assert healthy.value() == BLOB and healthy_done == [len(BLOB)]
    assert h.store.contains(digest_of(BLOB))


def test_a_reader_paused_by_its_last_write_still_completes(h: Harness) -> None:
    download = h.start(b"tiny")
    consumer = StringTransport()
    original = consumer.write

    def write_then_pause(data: bytes) -> None:
        original(data)
        reader.pauseProducing()

    consumer.write = write_then_pause  # type: ignore[method-assign]
    reader = download.attach(consumer)
    done = outcome(reader.done)
    download.write(b"tiny")
    download.finish()
    assert consumer.value() == b"tin" and done == []  # paused: no more bytes
    reader.resumeProducing()  # the last byte goes, and the write pauses the reader again
    assert consumer.value() == b"tiny" and done == [4]
