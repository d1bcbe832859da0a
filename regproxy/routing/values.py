"""What a route's values mean, whether a flag or a routes file gives them: one function
each, used by both (``regproxy.option_values`` for the flags, ``routing.load`` for the
file), so a value one refuses the other refuses too.

Each takes the value as given and returns it typed, or raises ``ValueError`` with a
sentence that says what to give instead (the caller adds the option's or the key's name).
"""

from __future__ import annotations

import ipaddress
import os
import re

from ..cache.s3.settings import StoreLocation
from ..config import BlobRedirects, Upstream, known_upstream
from ..protocol.reference import NAME_RE

_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


def upstream_url(text: str) -> Upstream:
    """``--upstream``: a URL, or a bare host meaning https."""
    upstream = Upstream.from_url(text.strip())
    host = upstream.host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(
                f"{text.strip()!r} is not a registry URL; give one such as https://gcr.io"
            ) from None
    return upstream


upstream_url.coerceDoc = (  # type: ignore[attr-defined]
    "A URL such as https://gcr.io or http://127.0.0.1:5000; a bare host means https."
)


def upstream_name(text: str) -> Upstream:
    """A routes file's ``upstream``: what ``--upstream`` takes, or a known registry's name
    (``docker.io`` stands for its API host, registry-1.docker.io)."""
    return upstream_url(known_upstream(text) or text)


def repository_prefix(text: str) -> str:
    prefix = text.strip().strip("/")
    if prefix and not NAME_RE.fullmatch(prefix):
        raise ValueError(f"{prefix!r} is not a valid repository path")
    return prefix


def readable_file(text: str) -> str:
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise ValueError(f"{text!r} is not a readable file")
    return text


def blob_redirects(text: str) -> BlobRedirects:
    try:
        return BlobRedirects(text.strip().lower())
    except ValueError:
        raise ValueError("use 'pass', 'follow' or 'store'") from None


blob_redirects.coerceDoc = (  # type: ignore[attr-defined]
    "'pass' hands redirects to clients; 'follow' streams them through; 'store' answers "
    "blobs the object store holds with a redirect to it."
)


def store_location(text: str) -> str:
    """An object store location, ``s3://BUCKET/PREFIX`` (normalised)."""
    return str(StoreLocation.parse(text.strip()))


store_location.coerceDoc = "An s3://BUCKET/PREFIX location."  # type: ignore[attr-defined]


def credentials_directory(directory: str) -> tuple[str, str] | None:
    """Username and password file from one directory, so that they come and go together:
    ``(username, password file)``, or None when the directory holds neither.

    A Kubernetes Secret mounted as an optional volume is an empty directory until the
    Secret exists; reading both files from it means a Secret without a matching setting
    (or a setting without its Secret) cannot stop the pods from starting.
    """
    username = os.path.join(directory, "username")
    password = os.path.join(directory, "password")
    present = [os.path.isfile(path) for path in (username, password)]
    if not any(present):
        return None
    if not all(present):
        missing = "password" if present[0] else "username"
        raise ValueError(f"{directory} has no {missing!r} file")
    try:
        with open(username, encoding="utf-8") as handle:
            name = handle.read().strip()
    except OSError as error:
        raise ValueError(str(error)) from None
    if not name:
        raise ValueError(f"{username} is empty")
    return name, readable_file(password)
