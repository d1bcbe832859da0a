"""Making a cache volume fail on purpose in unit tests: every write under a directory fails
with an errno (a full disk, a read-only or failing volume), and lifting it again."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT


class FailingVolume:
    """While ``on``, writing files under ``root`` fails with ``code``; so do fsync and rename
    (the calls a commit makes). Creating an empty file still works on a full volume (ENOSPC:
    inodes are left, blocks are not), not on a read-only or failing one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: str, code: int = errno.ENOSPC):
        self.root = str(root)
        self.code = code
        self.on = False
        self.failures = 0
        self._fds: set[int] = set()
        real_open, real_write = os.open, os.write
        real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

        def fail() -> None:
            self.failures += 1
            raise OSError(self.code, os.strerror(self.code))

        def opened(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if self.on and str(path).startswith(self.root) and flags & _WRITING:
                creating = flags & os.O_CREAT and not os.path.exists(path)
                if creating and self.code != errno.ENOSPC:
                    fail()
            fd = real_open(path, flags, *args, **kwargs)
            if str(path).startswith(self.root) and flags & _WRITING:
                self._fds.add(fd)
            return fd

        def write(fd: int, data: Any) -> int:
            if self.on and fd in self._fds:
                fail()
            return real_write(fd, data)

        def fsync(fd: int) -> None:
            if self.on and fd in self._fds:
                fail()
            real_fsync(fd)

        def rename(source: Any, target: Any) -> None:
            if self.on and str(target).startswith(self.root):
                fail()
            real_rename(source, target)

        def replace(source: Any, target: Any) -> None:
            if self.on and str(target).startswith(self.root):
                fail()
            real_replace(source, target)

        monkeypatch.setattr(os, "open", opened)
        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "replace", replace)
