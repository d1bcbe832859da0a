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
        raise ValueError("use 'pass' or 'follow'") from None


blob_redirects.coerceDoc = "'pass' hands redirects to clients; 'follow' streams them through."  # type: ignore[attr-defined]
