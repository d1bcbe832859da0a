"""Where the store keeps things on disk, and the few file operations every part of it shares.

``blobs/sha256/ab/abcd...`` holds committed objects, ``blobs/sha256/ab/.tmp-abcd...-<pid>-<r>``
downloads in progress, ``locks/`` the per-digest lock files and ``index/`` what the index has
learnt. Nothing here keeps state beyond the root's paths.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator

TEMP_PREFIX = ".tmp-"
_WRITER = ".w"
"""Suffix of a digest's download lock key; the bare digest is its read lock key."""

HASH_CHUNK = 1024 * 1024


def download_key(hex_: str) -> str:
    return hex_ + _WRITER


def is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


class Layout:
    """The paths under one cache directory."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.blobs_dir = os.path.join(root, "blobs", "sha256")
        self.locks_dir = os.path.join(root, "locks")
        self.index_dir = os.path.join(root, "index")

    def object_path(self, hex_: str) -> str:
        return os.path.join(self.blobs_dir, hex_[:2], hex_)

    def temp_path(self, hex_: str) -> str:
        name = f"{TEMP_PREFIX}{hex_}-{os.getpid()}-{secrets.token_hex(4)}"
        return os.path.join(self.blobs_dir, hex_[:2], name)

    def listing(self) -> Iterator[tuple[str, str]]:
        """(shard, name) of every file in the blob shards; strangers included."""
        try:
            shards = sorted(os.listdir(self.blobs_dir))
        except OSError:
            return  # gone or unreadable: nothing there to trust
        for shard in shards:
            if len(shard) != 2 or not is_hex(shard):
                continue
            try:
                names = os.listdir(os.path.join(self.blobs_dir, shard))
            except OSError:
                continue
            for name in names:
                yield shard, name


def read_all(fd: int, size: int) -> bytes:
    parts = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def hash_slice(fd: int, hasher: hashlib._Hash, offset: int, length: int = HASH_CHUNK) -> int:
    """Feed ``length`` bytes at ``offset`` into ``hasher``; returns how many there were
    (0 at the end of the file). Only reads: safe in a thread."""
    chunk = os.pread(fd, length, offset)
    hasher.update(chunk)
    return len(chunk)


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the file itself is synced
    finally:
        os.close(fd)
