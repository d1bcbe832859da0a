"""Per-digest lock files shared by every process using one cache directory.

POSIX record locks (``fcntl``/``lockf``) because they are the locks NFS (v4, or v3 with lockd),
CephFS and EFS implement across hosts; ``flock`` is emulated with them on Linux NFS anyway.
Their two traps are handled here:

- a record lock belongs to the *process*: a second lock on the same file from the same process
  always succeeds, and closing *any* descriptor of the file drops all of the process's locks on
  it. So each process keeps at most one descriptor per lock file (``ProcessLocks``) and decides
  conflicts inside the process itself;
- a lock file may be removed (after an eviction or a finished download) while another process
  waits to lock it: a lock taken on a file that is no longer at its path is worthless, so after
  locking we check that the path still names the file we locked, and start again if not.

Locks are only ever *tried* (non-blocking): the reactor thread must never wait for another
process; callers that need to wait poll with their clock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import attrs


@attrs.define(eq=False)
class _Held:
    fd: int
    path: str
    exclusive: bool
    holders: int = 1


@attrs.define(eq=False)
class HeldLock:
    """One holder's share of a lock; ``release`` exactly once."""

    _owner: ProcessLocks
    key: str
    exclusive: bool
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._owner._release(self.key)


class ProcessLocks:
    """This process's view of the lock files under ``directory`` (``ab/abcd....lock``).

    ``exclusive(key)`` fails if anyone, in this process or another, holds the key in either
    mode; ``shared(key)`` is granted to any number of holders in any number of processes. The
    store uses two keys per digest: ``<hex>.w``, held exclusively by its one download, and
    ``<hex>``, held shared by readers of the committed object and exclusively by an evictor.
    An exclusive holder removes the lock file when it releases, so lock files do not pile up.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._held: dict[str, _Held] = {}

    def path(self, key: str) -> str:
        return os.path.join(self.directory, key[:2], key + ".lock")

    def held(self, key: str) -> bool:
        """Whether this process holds ``key`` in any mode."""
        return key in self._held

    def exclusive(self, key: str) -> HeldLock | None:
        if key in self._held:
            return None
        fd = self._lock(key, exclusive=True)
        if fd is None:
            return None
        self._held[key] = _Held(fd, self.path(key), exclusive=True)
        return HeldLock(self, key, exclusive=True)

    def shared(self, key: str) -> HeldLock | None:
        held = self._held.get(key)
        if held is not None:
            if held.exclusive:
                return None
            held.holders += 1
            return HeldLock(self, key, exclusive=False)
        fd = self._lock(key, exclusive=False)
        if fd is None:
            return None
        self._held[key] = _Held(fd, self.path(key), exclusive=False)
        return HeldLock(self, key, exclusive=False)

    def _release(self, key: str) -> None:
        held = self._held[key]
        held.holders -= 1
        if held.holders > 0:
            return
        del self._held[key]
        if held.exclusive:
            # Unlink while still holding the lock: a process that opened the old file and
            # waits for it will find the path gone (or a new file) and start again.
            # Any error: a read-only or failing volume must not turn a release into a crash.
            with contextlib.suppress(OSError):
                os.unlink(held.path)
        os.close(held.fd)

    def _lock(self, key: str, *, exclusive: bool) -> int | None:
        path = self.path(key)
        for _attempt in range(8):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                continue
            try:
                mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
                fcntl.lockf(fd, mode | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return None
            try:
                on_disk = os.stat(path)
            except FileNotFoundError:
                on_disk = None
            mine = os.fstat(fd)
            if on_disk is not None and (on_disk.st_ino, on_disk.st_dev) == (
                mine.st_ino,
                mine.st_dev,
            ):
                return fd
            # Removed (or replaced) by the previous holder between our open and our lock.
            os.close(fd)
        return None
