"""What the cache has learnt about repositories and tags, kept as small files.

- ``repos/<key(route, repository)>/<hex>``: an empty file per digest the repository is known to
  hold (a manifest of it listed the digest, or the upstream served it for it). Checked by one
  ``stat``; never removed by eviction, because it is a fact about the upstream, not about the
  bytes on disk.
- ``tags/<key(route, repository)>/<key(tag, accept key)>``: a small JSON record, the digest the
  tag last resolved to and when the upstream last confirmed it.
- ``media/<ab>/<hex>``: the ``Content-Type`` the upstream served a manifest's digest with, so
  a manifest of any size (up to the 4 MiB limit) is served with it again, also after a
  restart, without reading its bytes.

Why files rather than SQLite: several processes, and replicas on a shared volume, must update
the index at once. SQLite's WAL mode needs shared memory and does not work on a network file
system, and its rollback-journal mode depends on byte-range locks that NFS implements unevenly
(sqlite.org/wal.html, sqlite.org/lockingv3.html "How To Corrupt"). A file replaced with
``rename`` is atomic on every POSIX file system including NFS, needs no lock, and a record
either exists whole or not at all; the last writer wins, which is right for "last confirmed".

The index is not fsynced: it is a cache of the upstream's answers. After a power loss a record
may be missing, older, or (on some file systems) empty; readers treat an unreadable record as
absent, so the worst outcome is one more question to the upstream.

Writes never raise: a full, read-only or failing volume costs a later question to the
upstream, not an error. Each failure is counted and logged once per streak (``WriteFailures``);
nothing is remembered in memory as written, so the next write of the same fact tries again
and the index recovers by itself when space returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable

import attrs

from .faults import WriteFailures
from .metrics import NullMetrics
from .objects import sha256_hex

_MEMO_LIMIT = 100_000
_MEDIA_TYPE_LIMIT = 255
INDEX = "index"


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:40]


@attrs.frozen
class TagRecord:
    digest: str
    confirmed_at: float


class CacheIndex:
    """(route, repository) -> digests held; (route, repository, tag, accept key) -> digest.

    ``accept_key`` is whatever the caller uses to tell apart answers to different ``Accept``
    headers for one tag (an image index and a single-platform manifest are different digests).
    """

    def __init__(
        self,
        directory: str,
        *,
        clock: Callable[[], float],
        confirm_resolution: float = 1.0,
        failures: WriteFailures | None = None,
    ) -> None:
        self.directory = directory
        self._clock = clock
        self._confirm_resolution = confirm_resolution
        self._failures = failures if failures is not None else WriteFailures(NullMetrics())
        self._known: set[tuple[str, str]] = set()
        self._written: dict[str, TagRecord] = {}
        self._media_types: dict[str, bytes] = {}
        for part in ("repos", "tags", "media"):
            # Created on first write otherwise: an unwritable volume must not stop start-up.
            with contextlib.suppress(OSError):
                os.makedirs(os.path.join(directory, part), exist_ok=True)

    # Repository membership.

    def record_repository_digest(self, route: str, repository: str, digest: str) -> None:
        """The upstream said R holds ``digest`` (directly, or through a manifest of R)."""
        hex_ = sha256_hex(digest)
        repo = _key(route, repository)
        if (repo, hex_) in self._known:
            return
        path = os.path.join(self.directory, "repos", repo, hex_)
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                self._write_names(os.path.dirname(path), route, repository)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.close(fd)
        except OSError as error:
            self._failures.failed(INDEX, "repository record", error)
            return
        self._failures.succeeded(INDEX, "repository record")
        self._remember((repo, hex_))

    def repository_holds(self, route: str, repository: str, digest: str) -> bool:
        hex_ = sha256_hex(digest)
        repo = _key(route, repository)
        if (repo, hex_) in self._known:
            return True
        # Another process may have learnt it: ask the disk (a stat) before saying no (an
        # unreadable disk says no: the upstream is asked instead).
        if os.path.exists(os.path.join(self.directory, "repos", repo, hex_)):
            self._remember((repo, hex_))
            return True
        return False

    # Tags.

    def record_tag(
        self, route: str, repository: str, tag: str, accept_key: str, digest: str
    ) -> TagRecord:
        """The upstream just said ``tag`` is ``digest``: remember it, confirmed now."""
        sha256_hex(digest)
        now = self._clock()
        record = TagRecord(digest, now)
        repo = _key(route, repository)
        name = _key(tag, accept_key)
        path = os.path.join(self.directory, "tags", repo, name)
        previous = self._written.get(path)
        if (
            previous is not None
            and previous.digest == digest
            and 0 <= now - previous.confirmed_at < self._confirm_resolution
        ):
            # A hundred confirmations a second need not be a hundred renames.
            return previous
        body = json.dumps(
            {
                "route": route,
                "repository": repository,
                "tag": tag,
                "accept": accept_key,
                "digest": digest,
                "confirmed": now,
            }
        ).encode()
        if not self._replace(path, name, body, (route, repository), "tag record"):
            return record  # not kept: the next request asks the upstream again
        if len(self._written) >= _MEMO_LIMIT:
            self._written.clear()
        self._written[path] = record
        return record

    def tag(self, route: str, repository: str, tag: str, accept_key: str) -> TagRecord | None:
        """The last digest recorded for the tag (by any process), or None."""
        path = os.path.join(self.directory, "tags", _key(route, repository), _key(tag, accept_key))
        try:
            with open(path, "rb") as file:
                data = json.loads(file.read(65536))
            if (data["route"], data["repository"], data["tag"], data["accept"]) != (
                route,
                repository,
                tag,
                accept_key,
            ):
                return None
            digest = data["digest"]
            sha256_hex(digest)
            return TagRecord(digest, float(data["confirmed"]))
        except (OSError, ValueError, KeyError, TypeError):
            # Missing, or torn by a crash before it reached the disk: not known.
            return None

    # Media types of manifests.

    def record_media_type(self, digest: str, content_type: bytes) -> None:
        """The upstream served ``digest`` with this ``Content-Type``: serve it so again.

        Ignored when the value could not be a header value (control bytes, over 255 bytes):
        it is sent to clients as it is.
        """
        hex_ = sha256_hex(digest)
        content_type = content_type.strip()
        if not _valid_media_type(content_type):
            return
        if self._media_types.get(hex_) == content_type:
            return
        path = self._media_path(hex_)
        if not self._replace(path, hex_, content_type, None, "media type"):
            return
        if len(self._media_types) >= _MEMO_LIMIT:
            self._media_types.clear()
        self._media_types[hex_] = content_type

    def media_type(self, digest: str) -> bytes | None:
        """The ``Content-Type`` recorded for ``digest`` (by any process), or None."""
        hex_ = sha256_hex(digest)
        known = self._media_types.get(hex_)
        if known is not None:
            return known
        try:
            with open(self._media_path(hex_), "rb") as file:
                content_type = file.read(_MEDIA_TYPE_LIMIT + 1).strip()
        except OSError:
            return None
        if not _valid_media_type(content_type):
            return None  # torn by a crash, or not ours
        if len(self._media_types) >= _MEMO_LIMIT:
            self._media_types.clear()
        self._media_types[hex_] = content_type
        return content_type

    def _media_path(self, hex_: str) -> str:
        return os.path.join(self.directory, "media", hex_[:2], hex_)

    # Writing.

    def _replace(
        self, path: str, name: str, body: bytes, names: tuple[str, str] | None, what: str
    ) -> bool:
        """Write ``body`` to ``path`` whole or not at all (a temporary file renamed over it);
        False, with nothing left behind, when the volume refuses."""
        directory = os.path.dirname(path)
        temp = os.path.join(directory, f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            try:
                fd = os.open(temp, flags, 0o644)
            except FileNotFoundError:
                os.makedirs(directory, exist_ok=True)
                if names is not None:
                    self._write_names(directory, *names)
                fd = os.open(temp, flags, 0o644)
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(temp, path)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            self._failures.failed(INDEX, what, error)
            return False
        self._failures.succeeded(INDEX, what)
        return True

    def _remember(self, item: tuple[str, str]) -> None:
        if len(self._known) >= _MEMO_LIMIT:
            self._known.clear()
        self._known.add(item)

    @staticmethod
    def _write_names(directory: str, route: str, repository: str) -> None:
        """A readable name beside the hashed directory name, for operators looking around."""
        try:
            with open(os.path.join(directory, ".name"), "w", encoding="utf-8") as file:
                file.write(f"{route}\n{repository}\n")
        except OSError:
            pass


def _valid_media_type(value: bytes) -> bool:
    return 0 < len(value) <= _MEDIA_TYPE_LIMIT and all(0x20 <= b < 0x7F for b in value)
