"""The workers' file: counts shared through SQLite, pruned, and never a stall or a failure
when the file is locked or broken (the worker counts in memory meanwhile, logged once)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent

from regproxy.access._counts import MemoryCounts, Slot
from regproxy.access._fallback import FallbackCounts
from regproxy.access._shared_counts import BUSY_TIMEOUT, PRUNE_INTERVAL, RETRY_AFTER, SharedCounts
from regproxy.access.limits import WindowLimiter
from regproxy.config import RateLimit

from .test_limits import result

LIMIT = RateLimit.parse("3/1m")
KEY = "anonymous:192.0.2.7"
# One second into KEY's window: a test that waits a little stays in it.
NOW = Slot.of(KEY, 60, 1_700_000_000.0).start / 1000 + 1


class Worker:
    """One worker's limiter on the shared file, falling back to its memory."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self.shared = SharedCounts(str(path))
        self.events: list[dict[str, Any]] = []
        counts = FallbackCounts(self.shared, MemoryCounts(), what="the file", instead="here")
        counts.log = Logger(observer=self.events.append)
        self.limiter = WindowLimiter(counts, clock)

    def remaining(self, key: str = KEY) -> int:
        return result(self.limiter.take(key, LIMIT)).remaining

    def messages(self) -> list[tuple[LogLevel, str]]:
        return [(event["log_level"], formatEvent(event)) for event in self.events]


def workers(tmp_path: Path, count: int = 2) -> tuple[list[Worker], Clock, Path]:
    clock = Clock()
    clock.advance(NOW)
    path = tmp_path / "limits.sqlite"
    return [Worker(path, clock) for _ in range(count)], clock, path


def rows(path: Path) -> list[tuple[str, int, int, int]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return sorted(db.execute("SELECT key, length, start, count FROM counts"))


def test_workers_count_together_and_a_new_window_starts_over(tmp_path: Path) -> None:
    (first, second), clock, path = workers(tmp_path)
    assert [first.remaining(), second.remaining(), first.remaining()] == [2, 1, 0]
    assert not result(second.limiter.take(KEY, LIMIT)).allowed
    slot = Slot.of(KEY, 60, NOW)
    assert rows(path) == [(KEY, 60000, slot.start, 4)]
    clock.advance(slot.end / 1000 - NOW)
    assert second.remaining() == 2
    assert rows(path) == [(KEY, 60000, slot.end, 1)]


def test_a_worker_whose_clock_is_behind_counts_in_the_newer_window(tmp_path: Path) -> None:
    (ahead, behind), clock, path = workers(tmp_path)
    slot = Slot.of(KEY, 60, NOW)
    clock.advance(slot.end / 1000 - NOW)
    ahead.remaining()
    newer = Slot.of(KEY, 60, clock.seconds())
    behind.shared.increment(slot, NOW)  # still in the old window by its clock
    assert rows(path) == [(KEY, 60000, newer.start, 2)]


def test_rows_of_ended_windows_are_pruned(tmp_path: Path) -> None:
    (worker,), clock, path = workers(tmp_path, 1)
    worker.remaining("old")
    clock.advance(PRUNE_INTERVAL + 60)
    worker.remaining("new")
    assert [row[0] for row in rows(path)] == ["new"]
    clock.advance(30)
    worker.remaining("newer")  # pruning waits for its interval
    assert [row[0] for row in rows(path)] == ["new", "newer"]


def test_a_held_lock_costs_one_busy_timeout_then_memory_until_retry(tmp_path: Path) -> None:
    (worker, other), clock, path = workers(tmp_path)
    worker.remaining()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a worker stopped while it writes
    try:
        started = time.monotonic()
        assert worker.remaining() == 2  # in its memory: 1 there so far
        assert time.monotonic() - started < BUSY_TIMEOUT + 0.5
        started = time.monotonic()
        for _ in range(20):
            worker.remaining("anonymous:192.0.2.8")
        assert time.monotonic() - started < BUSY_TIMEOUT  # the file is not tried again
        [(level, message)] = worker.messages()
        assert level is LogLevel.warn and "database is locked" in message
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    clock.advance(RETRY_AFTER)
    assert worker.remaining() == 1  # the file again: 1 before, this one
    assert worker.messages()[1] == (
        LogLevel.info,
        "rate limits: the file works again; counting there",
    )
    assert other.remaining() == 0 and other.messages() == []


def test_a_broken_file_falls_back_to_memory(tmp_path: Path) -> None:
    (tmp_path / "limits.sqlite").write_bytes(b"not a database, not at all" * 100)
    (worker,), clock, _ = workers(tmp_path, 1)
    assert [worker.remaining() for _ in range(3)] == [2, 1, 0]
    clock.advance(RETRY_AFTER)
    assert not result(worker.limiter.take(KEY, LIMIT)).allowed
    [(level, message)] = worker.messages()
    assert level is LogLevel.warn and "DatabaseError" in message


def test_a_missing_directory_falls_back_to_memory(tmp_path: Path) -> None:
    (worker,), _, _ = workers(tmp_path / "gone", 1)
    assert worker.remaining() == 2
    assert "unable to open database file" in worker.messages()[0][1]


def test_closing_lets_go_of_the_file(tmp_path: Path) -> None:
    (worker,), _, _ = workers(tmp_path, 1)
    worker.remaining()
    closed: list[object] = []
    worker.limiter.close().addCallback(closed.append)
    assert closed == [None]
    assert worker.shared._db is None
