"""Exact limits across the workers of one proxy: separate processes taking from one shared
directory at the same time admit exactly the count, and a process that dies holding the
file's lock wedges nobody."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet.task import Clock

from regproxy.access._counts import Slot
from regproxy.access.limits import SHARED_FILE, Verdict, build_limiter
from regproxy.config import LimitsConfig, RateLimit
from tests.support.waiting import eventually

from .limits_driver import Driver


def key_with_time_left(window: float, prefix: str = "anonymous:test") -> str:
    """A key whose current window has more than a tenth of it left: the test stays in it."""
    for i in range(1000):
        key = f"{prefix}-{i}"
        slot = Slot.of(key, window, time.time())
        if slot.end / 1000 - time.time() > window / 10:
            return key
    raise AssertionError("no key found")


def test_two_processes_on_one_directory_admit_exactly_the_count(tmp_path: Path) -> None:
    drivers = [Driver("--shared", str(tmp_path)) for _ in range(2)]
    try:
        for driver in drivers:
            driver.logs()  # started
        key = key_with_time_left(3600)
        at = time.time() + 0.5
        for driver in drivers:
            driver.send({"take": key, "limit": "1500/1h", "n": 2000, "at": at})
        answers = [driver.receive() for driver in drivers]
        assert sum(answer["allowed"] for answer in answers) == 1500
        for answer in answers:
            # How the two interleave is the scheduler's business (under load one may even
            # finish first): the exact sum is what proves they count together.
            assert answer["logs"] == []
            assert all(0 < retry <= 3600 for retry in answer["retry_after"][answer["allowed"] :])
        print(f"µs per take (two processes at once): {[a['per_take'] * 1e6 for a in answers]}")
    finally:
        for driver in drivers:
            driver.stop()
    assert (tmp_path / SHARED_FILE).stat().st_size < 1 << 20


HOLD_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("holding", flush=True)
time.sleep(600)
"""


def test_a_process_killed_while_it_holds_the_lock_wedges_nobody(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(time.time())
    limiter = build_limiter(LimitsConfig(), clock, str(tmp_path))
    limit = RateLimit.parse("5/1h")
    key = key_with_time_left(3600)

    def remaining() -> int:
        # The workers' file answers at once (or its fallback, memory, does).
        verdicts: list[Verdict] = []
        limiter.take(key, limit).addCallback(verdicts.append)
        return verdicts[0].remaining

    assert remaining() == 4
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / SHARED_FILE)], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        started = time.monotonic()
        assert remaining() == 4  # counted in this process's memory meanwhile
        assert time.monotonic() - started < 1.0
        holder.kill()
        holder.wait()

        def counted_in_the_file_again() -> bool:
            clock.advance(1.0)
            remaining()
            with contextlib.closing(sqlite3.connect(tmp_path / SHARED_FILE)) as db:
                [(count,)] = db.execute("SELECT count FROM counts").fetchall()
            return bool(count >= 2)

        eventually(counted_in_the_file_again, 10, what="the file in use again")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        limiter.close()
