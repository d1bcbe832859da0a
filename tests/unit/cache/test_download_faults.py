"""Downloads under faults: a store that stops writing mid-download never cuts a reader the
upstream still serves (the rest streams from memory, in lockstep, still verified), and what
downloads nobody reads any more may fetch is bounded for the whole process."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from regproxy.cache.budget import OrphanBudget
from regproxy.cache.download import (
    Abandoned,
    Download,
    DownloadProtocol,
    Downloads,
)
from regproxy.cache.store import DigestMismatch, PendingObject

from .cache_helpers import digest_of
from .test_download import BLOB, PARTS, Harness, outcome, reader_on


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def disk_full_after(
    monkeypatch: pytest.MonkeyPatch, limit: int, error: int = errno.ENOSPC
) -> None:
    """Every pending object refuses writes past ``limit`` bytes, as a full volume does."""
    original = PendingObject.write

    def write(self: PendingObject, data: bytes) -> None:
        if self.size + len(data) > limit:
            raise OSError(error, "No space left on device")
        original(self, data)

    monkeypatch.setattr(PendingObject, "write", write)


def files_in(h: Harness) -> list[Path]:
    return [p for p in Path(h.store.blobs_dir).rglob("*") if p.is_file()]


class BodyTransport(StringTransport):
    """An upstream body transport that records flow control."""

    def __init__(self) -> None:
        super().__init__()
        self.flow: list[str] = []

    def pauseProducing(self) -> None:
        self.flow.append("pause")

    def resumeProducing(self) -> None:
        self.flow.append("resume")

    def stopProducing(self) -> None:
        self.flow.append("stop")


def feeding(download: Download) -> tuple[DownloadProtocol, BodyTransport]:
    protocol = DownloadProtocol(download)
    transport = BodyTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_a_write_failure_streams_on_to_every_reader(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk_full_after(monkeypatch, 35_000)
    download = h.start(expected_size=len(BLOB))
    _, first, first_done = reader_on(download)
    _, second, second_done = reader_on(download, 20_000, 99_999)
    committed = outcome(download.done)
    for part in PARTS[:4]:
        download.write(part)
    assert not download.stored
    # Its file and lock are gone, and nobody new may join it.
    assert files_in(h) == []
    assert h.downloads.get(digest_of(BLOB)) is None
    with pytest.raises(ValueError):
        download.attach(StringTransport())
    assert h.metrics.counters["store_write_errors"] == 1
    for part in PARTS[4:]:
        download.write(part)
    assert first.value() == BLOB[:-1]
    download.finish()
    assert first.value() == BLOB and first_done == [len(BLOB)]
    assert second.value() == BLOB[20_000:100_000] and second_done == [80_000]
    assert committed == [False]
    assert files_in(h) == [] and len(h.downloads) == 0
    assert h.metrics.counters["bytes_from_upstream"] == len(BLOB)


def test_without_the_store_another_download_of_the_digest_may_start(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk_full_after(monkeypatch, 0)
    download = h.start()
    reader_on(download)
    download.write(PARTS[0])
    assert not download.stored
    monkeypatch.undo()  # space is back
    again = h.downloads.start(digest_of(BLOB))
    assert again is not None and again is not download
    _, _, done = reader_on(again)
    for part in PARTS:
        again.write(part)
    again.finish()
    assert done == [len(BLOB)] and h.store.contains(digest_of(BLOB))


def test_without_the_store_a_paused_reader_holds_the_upstream_and_memory_stays_small(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk_full_after(monkeypatch, 50_000)
    download = h.start(expected_size=len(BLOB))
    protocol, transport = feeding(download)
    slow, slow_consumer, slow_done = reader_on(download)
    _, fast, fast_done = reader_on(download)
    for part in PARTS[:3]:
        protocol.dataReceived(part)
    slow.pauseProducing()  # at 29 999: behind the 50 000 bytes the file will hold
    for part in PARTS[3:6]:
        protocol.dataReceived(part)
    # The store failed at 50 000: the upstream is held for the paused reader.
    assert not download.stored and transport.flow == ["pause"]
    # Bytes the upstream had in flight still arrive, and are kept for the slow reader.
    protocol.dataReceived(PARTS[6])
    assert download.buffered <= 3 * 10_000
    assert fast.value() == BLOB[:70_000]
    slow.resumeProducing()  # reads the file up to 50 000, then memory
    assert slow_consumer.value() == BLOB[:70_000]
    assert transport.flow == ["pause", "resume"]
    assert download.buffered <= 10_000
    for part in PARTS[7:]:
        protocol.dataReceived(part)
        assert download.buffered <= 10_000
    protocol.connectionLost(Failure(ResponseDone()))
    assert slow_consumer.value() == fast.value() == BLOB
    assert slow_done == fast_done == [len(BLOB)]


def test_without_the_store_a_range_waiting_for_the_verdict_pins_no_memory(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk_full_after(monkeypatch, 0)
    download = h.start(expected_size=len(BLOB))
    _, ranged, ranged_done = reader_on(download, 100, 199)
    _, whole, whole_done = reader_on(download)
    for part in PARTS:
        download.write(part)
        assert download.buffered <= 10_000
    assert ranged.value() == BLOB[100:199] and ranged_done == []
    download.finish()
    assert ranged.value() == BLOB[100:200] and ranged_done == [100]
    assert whole.value() == BLOB and whole_done == [len(BLOB)]


def test_without_the_store_wrong_bytes_fail_every_reader_before_its_last_byte(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk_full_after(monkeypatch, 25_000)
    download = h.start()
    _, whole, whole_done = reader_on(download)
    corrupt = BLOB[:-5] + b"XXXXX"
    for i in range(0, len(corrupt), 10_000):
        download.write(corrupt[i : i + 10_000])
    download.finish()
    assert len(whole.value()) < len(BLOB)
    assert whole_done[0].check(DigestMismatch)
    assert h.metrics.counters["digest_mismatches"] == 1


def test_without_the_store_the_last_reader_leaving_stops_the_upstream(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk_full_after(monkeypatch, 10_000)
    download = h.start(expected_size=len(BLOB))
    _, transport = feeding(download)
    reader, _, _ = reader_on(download)
    done = outcome(download.done)
    download.write(PARTS[0])
    download.write(PARTS[1])
    reader.stopProducing()  # a download with a file would go on (under the orphan limit)
    assert transport.flow == ["stop"]
    assert done == [False] and download.failure is not None
    assert download.failure.check(Abandoned)


def test_a_write_failure_with_no_reader_left_stops_the_upstream(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk_full_after(monkeypatch, 10_000)
    download = h.start(expected_size=len(BLOB) - 200_000 + 10_000)  # under the orphan limit
    _, transport = feeding(download)
    reader, _, _ = reader_on(download)
    download.write(PARTS[0])
    reader.stopProducing()
    assert transport.flow == []  # orphaned, goes on into the cache...
    download.write(PARTS[1])  # ...until the store fails: nobody to stream to
    assert transport.flow == ["stop"]
    assert files_in(h) == []


def test_a_sync_failure_still_completes_every_reader(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.store.fsync = True

    def failing_runner(work: Any) -> Any:
        from twisted.internet.defer import fail

        return fail(OSError(errno.EIO, "Input/output error"))

    h.downloads = Downloads(h.store, clock=h.reactor, run_blocking=failing_runner)
    download = h.start()
    _, consumer, done = reader_on(download)
    committed = outcome(download.done)
    for part in PARTS:
        download.write(part)
    download.finish()
    assert consumer.value() == BLOB and done == [len(BLOB)]
    assert committed == [False]
    assert h.metrics.counters["store_write_errors"] == 1
    assert files_in(h) == [] and not h.store.contains(digest_of(BLOB))


def test_a_store_that_cannot_start_a_download_is_counted_and_passes(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: Any, digest: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(type(h.store), "begin_write", refuse)
    assert h.downloads.start(digest_of(BLOB)) is None
    assert h.metrics.counters["store_write_errors"] == 1


def test_write_failures_are_all_counted_and_logged_once_per_streak(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk_full_after(monkeypatch, 0)
    with capturedLogs() as events:
        for n in range(3):
            data = bytes([n]) * 1000
            download = h.start(data)
            reader_on(download)
            download.write(data)
            download.finish()
        h.reactor.advance(61)
        data = b"later" * 100
        download = h.start(data)
        reader_on(download)
        download.write(data)
    lines = [e for e in events if "cannot be written" in e.get("log_format", "")]
    # The store's one account of write failures: all counted, one line until writes work.
    assert h.metrics.counters["store_write_errors"] == 4
    assert len(lines) == 1


# One budget for every orphaned download of the process.

BLOBS = [bytes([n]) * 300_000 for n in range(4)]


def orphan(h: Harness, data: bytes, sent: int = 10_000) -> tuple[Download, list[str]]:
    """A download of ``data`` whose only reader left after ``sent`` bytes."""
    download = h.start(data, expected_size=len(data))
    _, transport = feeding(download)
    reader, _, _ = reader_on(download)
    download.write(data[:sent])
    reader.stopProducing()
    return download, transport.flow


@pytest.fixture
def budgeted(tmp_path: Path) -> Harness:
    h = Harness(tmp_path)
    # 290 000 bytes left per orphan; each would be allowed alone, two fit the budget.
    h.downloads = Downloads(
        h.store, clock=h.reactor, orphan_limit=1 << 30, orphan_budget=OrphanBudget(600_000)
    )
    return h


def test_orphans_beyond_the_shared_budget_stop(budgeted: Harness) -> None:
    flows = [orphan(budgeted, data)[1] for data in BLOBS[:3]]
    assert flows == [[], [], ["stop"]]
    assert budgeted.downloads.orphan_budget.used == 580_000
    assert budgeted.metrics.counters["orphans_stopped"] == 1


def test_an_orphan_that_ends_gives_its_share_back(budgeted: Harness) -> None:
    first, _ = orphan(budgeted, BLOBS[0])
    orphan(budgeted, BLOBS[1])
    first.write(BLOBS[0][10_000:])
    first.finish()
    assert budgeted.downloads.orphan_budget.used == 290_000
    assert orphan(budgeted, BLOBS[2])[1] == []


def test_a_download_that_gets_a_reader_back_is_no_longer_charged(budgeted: Harness) -> None:
    first, _ = orphan(budgeted, BLOBS[0])
    orphan(budgeted, BLOBS[1])
    assert budgeted.downloads.orphan_budget.used == 580_000
    _, back, back_done = reader_on(first)
    assert budgeted.downloads.orphan_budget.used == 290_000
    assert orphan(budgeted, BLOBS[2])[1] == []
    first.write(BLOBS[0][10_000:])
    first.finish()
    assert back.value() == BLOBS[0] and back_done == [len(BLOBS[0])]


def test_orphans_of_unknown_size_are_charged_as_they_fetch(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.downloads = Downloads(
        h.store, clock=h.reactor, orphan_limit=1 << 30, orphan_budget=OrphanBudget(25_000)
    )
    downloads, flows = [], []
    for data in BLOBS[:2]:
        download = h.start(data)
        _, transport = feeding(download)
        reader, _, _ = reader_on(download)
        download.write(data[:10_000])
        reader.stopProducing()
        downloads.append(download)
        flows.append(transport.flow)
    first, second = downloads
    first.write(BLOBS[0][10_000:20_000])
    second.write(BLOBS[1][10_000:20_000])
    assert h.downloads.orphan_budget.used == 20_000 and flows == [[], []]
    first.write(BLOBS[0][20_000:30_000])  # 30 000 in flight would be past the budget
    assert flows == [["stop"], []]
    assert h.downloads.orphan_budget.used == 10_000  # the stopped one gave its share back
    second.write(BLOBS[1][20_000:30_000])
    assert flows == [["stop"], []]


def test_the_budget_refuses_past_its_limit_and_releases_per_holder() -> None:
    budget = OrphanBudget(100)
    a, b = object(), object()
    assert budget.take(a, 60) and budget.take(a, 40)
    assert not budget.take(b, 1)
    assert budget.holds(a) == 100 and budget.holds(b) == 0
    budget.release(a)
    assert budget.used == 0 and budget.take(b, 100)
    with pytest.raises(ValueError):
        OrphanBudget(-1)
