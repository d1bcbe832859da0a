"""What a download in progress tells other processes on the same cache directory.

A process downloading a digest writes a temporary file with a random name (``store.py``); a
process that wants to read along must find it, and must learn what the upstream announced
before it answers its own clients: the size (Content-Length) and the headers worth repeating
(Content-Type). The writer publishes both in a small file at a name derived from the digest,
``.tmp-<hex>-progress`` beside the object, replaced atomically (write, then rename) so a reader
sees the whole of one version or none. The ``.tmp-<hex>`` prefix makes the store's start-up
clean-up remove one left by a writer that died (it does so only while the digest's download
lock is free).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Sequence

import attrs

_PREFIX = ".tmp-"
_SUFFIX = "-progress"


@attrs.frozen
class Progress:
    """A download in progress, as its writer announced it."""

    temp_path: str
    size: int | None
    headers: tuple[tuple[bytes, bytes], ...] = ()


def progress_path(object_path: str) -> str:
    """Where the progress of the object at ``object_path`` is published."""
    directory, hex_ = os.path.split(object_path)
    return os.path.join(directory, f"{_PREFIX}{hex_}{_SUFFIX}")


def publish(
    object_path: str,
    temp_path: str,
    size: int | None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Announce (or re-announce) the download writing ``temp_path``. Raises OSError."""
    final = progress_path(object_path)
    document = {
        "temp": os.path.basename(temp_path),
        "size": size,
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers],
    }
    scratch = f"{final}-{secrets.token_hex(4)}"
    try:
        with open(scratch, "x", encoding="utf-8") as out:
            json.dump(document, out)
        os.rename(scratch, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
        raise


def withdraw(object_path: str) -> None:
    """Remove the announcement (before the download lock is released: after it, the name
    may already be a new writer's). Best effort: a stale one costs readers a wrong guess,
    which the store's clean-up and their own hashing make harmless."""
    with contextlib.suppress(OSError):
        os.unlink(progress_path(object_path))


def read_progress(object_path: str) -> Progress | None:
    """The published progress of this object, or None (none, or not readable as one)."""
    path = progress_path(object_path)
    try:
        with open(path, encoding="utf-8") as source:
            document = json.load(source)
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict):
        return None
    temp, size, headers = document.get("temp"), document.get("size"), document.get("headers")
    hex_ = os.path.basename(object_path)
    if not isinstance(temp, str) or not temp.startswith(f"{_PREFIX}{hex_}-") or "/" in temp:
        return None
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        return None
    pairs: list[tuple[bytes, bytes]] = []
    for item in headers if isinstance(headers, list) else ():
        if (
            isinstance(item, list)
            and len(item) == 2
            and all(isinstance(part, str) for part in item)
        ):
            pairs.append((item[0].encode("latin-1"), item[1].encode("latin-1")))
    return Progress(os.path.join(os.path.dirname(object_path), temp), size, tuple(pairs))
