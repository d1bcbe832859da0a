"""Counts shared by the ``--workers`` of one proxy: one SQLite file in their shared directory.

Why SQLite: each take is one statement (an UPSERT that answers the new count), atomic across
processes by SQLite's own locking, a few tens of microseconds in WAL mode when a commit does
not wait for the disk. Its locks are fcntl locks, which the kernel releases when a process
dies, so a dead worker cannot wedge the others; a worker that is stopped while it holds the
write lock (or a full disk, a broken file) makes the others wait at most ``BUSY_TIMEOUT`` once,
after which they count in their own memory for ``RETRY_AFTER`` seconds before trying the file
again.

The calls block the reactor, for the time of one small write; a thread would cost more than
the write. One row per key and window length, overwritten when its window turns over; rows
whose window has ended are deleted every ``PRUNE_INTERVAL``, so the file holds only the keys
seen in the current windows.
"""

from __future__ import annotations

import contextlib
import sqlite3

from twisted.internet.defer import Deferred, fail, succeed

from ._counts import Slot

# Long enough that a busy machine, where the worker holding the lock for its few
# microseconds is merely not scheduled for a while, never splits the count (50 ms did, in a
# full test run on two loaded cores: two workers each admitted the whole limit); short
# enough that a worker stopped while holding it costs the others one pause per RETRY_AFTER.
BUSY_TIMEOUT = 0.5
# Opening may wait longer: workers that start together all set the file up at once (the
# switch to WAL needs the file to themselves), before any request.
OPEN_TIMEOUT = 5.0
RETRY_AFTER = 5.0
PRUNE_INTERVAL = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counts (
    key TEXT NOT NULL,
    length INTEGER NOT NULL,
    start INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (key, length)
) WITHOUT ROWID
"""
# A row from an older window starts over; a row from a newer window (another process whose
# clock is a little ahead) is counted in as it is, never moved back.
_TAKE = """
INSERT INTO counts (key, length, start, count) VALUES (?, ?, ?, 1)
ON CONFLICT (key, length) DO UPDATE SET
    count = CASE WHEN counts.start < excluded.start THEN 1 ELSE counts.count + 1 END,
    start = max(counts.start, excluded.start)
RETURNING count
"""
_PRUNE = "DELETE FROM counts WHERE start + length <= ?"


class SharedCountsUnavailable(Exception):
    """The shared file failed a moment ago; not tried again yet."""


class SharedCounts:
    """Counters in an SQLite file that several processes use at once."""

    def __init__(self, path: str, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None
        self._retry_at = 0.0
        self._last_error = ""
        self._prune_at = 0.0
        # On failure, the first take tries again, falls back and says why.
        with contextlib.suppress(sqlite3.Error):
            self._open(OPEN_TIMEOUT)

    def increment(self, slot: Slot, now: float) -> Deferred[int]:
        if now < self._retry_at:
            return fail(SharedCountsUnavailable(self._last_error))
        try:
            db = self._db or self._open(self.busy_timeout)
            if now >= self._prune_at:
                self._prune_at = now + PRUNE_INTERVAL
                db.execute(_PRUNE, (int(now * 1000),))
            # fetchall: with RETURNING, SQLite commits only once the statement has run out.
            [(count,)] = db.execute(_TAKE, (slot.key, slot.length, slot.start)).fetchall()
        except sqlite3.Error as error:
            self._broken(error, now)
            return fail(error)
        return succeed(int(count))

    def _open(self, timeout: float) -> sqlite3.Connection:
        # isolation_level None: each statement is its own transaction, nothing stays open.
        db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # Never wait for the disk: with NORMAL, the checkpoint every thousand commits
            # fsyncs while it holds the lock, and the other workers' takes waited milliseconds
            # for it (p99 1.4-5.7 ms against 30-65 us, measured). The price, a file an OS
            # crash may leave corrupt, is none when the directory is made afresh by each
            # run of the supervisor, as it should be; a corrupt file is not used (logged).
            db.execute("PRAGMA synchronous=OFF")
            db.execute(_SCHEMA)
            db.execute(f"PRAGMA busy_timeout = {round(self.busy_timeout * 1000)}")
        except sqlite3.Error:
            db.close()
            raise
        self._db = db
        return db

    def _broken(self, error: sqlite3.Error, now: float) -> None:
        self._last_error = f"{type(error).__name__}: {error}"
        self._retry_at = now + RETRY_AFTER
        # Opened afresh next time: a file replaced or repaired meanwhile is found.
        self.close()

    def close(self) -> Deferred[None]:
        if self._db is not None:
            self._db.close()
            self._db = None
        return succeed(None)
