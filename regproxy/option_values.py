"""What each option's text means: the typed coerce functions of the option table
(``regproxy.tap``) and of the environment variables (``regproxy.environment``).

Each takes the text as given and returns a typed value, or raises ``ValueError`` with a
sentence that says what to give instead (the caller adds the option's or variable's name).
"""

from __future__ import annotations

import ipaddress
import os
import re
from urllib.parse import urlsplit

from .cache.sizes import parse_size
from .config import BlobRedirects, Upstream
from .protocol.reference import NAME_RE
from .server.logs import LogFormat

_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


def upstream_url(text: str) -> Upstream:
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


def repository_prefix(text: str) -> str:
    prefix = text.strip().strip("/")
    if prefix and not NAME_RE.fullmatch(prefix):
        raise ValueError(f"{prefix!r} is not a valid repository path")
    return prefix


def readable_file(text: str) -> str:
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise ValueError(f"{text!r} is not a readable file")
    return text


def directory(text: str) -> str:
    if not os.path.isdir(text):
        raise ValueError(f"{text!r} is not a directory")
    return text


def cache_directory(text: str) -> str:
    """A directory the cache may use, made if missing (its parent must exist)."""
    path = os.path.abspath(text.strip())
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot use {path!r}: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{path!r} is not writable")
    return path


def public_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("give an absolute http(s) URL such as https://r.example.com")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError("give only scheme, host and port, with no path")
    return f"{parts.scheme}://{parts.netloc}"


def seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("a non-negative number of seconds is required")
    return value


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value == 0:
        raise ValueError("a positive number of seconds is required")
    return value


def blob_redirects(text: str) -> BlobRedirects:
    try:
        return BlobRedirects(text.strip().lower())
    except ValueError:
        raise ValueError("use 'pass', 'follow' or 'store'") from None


blob_redirects.coerceDoc = (  # type: ignore[attr-defined]
    "'pass' hands redirects to clients; 'follow' streams them through; 'store' answers "
    "blobs the object store holds with a redirect to it."
)


def endpoint(text: str) -> str:
    """A Twisted endpoint description; a bare port number means ``tcp:PORT``, as PORT does."""
    text = text.strip()
    if text.isdigit():
        if not 0 < int(text) < 65536:
            raise ValueError(f"{text} is not a TCP port number")
        return f"tcp:{text}"
    if not text:
        raise ValueError("give a port number or an endpoint such as tcp:8080")
    return text


endpoint.coerceDoc = "A port number or a Twisted endpoint such as tcp:8080:interface=127.0.0.1."  # type: ignore[attr-defined]


def log_format(text: str) -> LogFormat:
    try:
        return LogFormat(text.strip().lower())
    except ValueError:
        raise ValueError("use 'json' or 'text'") from None


def network(text: str) -> str:
    return str(ipaddress.ip_network(text.strip(), strict=False))


def byte_limit(text: str) -> int:
    """A size as ``--cache-max-size`` takes it (``1G``, ``500M``, bytes), or ``0``."""
    if text.strip() == "0":
        return 0
    return parse_size(text)


byte_limit.coerceDoc = "A size such as 1G, 500M or 1048576 (bytes), or 0."  # type: ignore[attr-defined]


def store_location(text: str) -> str:
    """An object store location, ``s3://BUCKET/PREFIX`` (normalised)."""
    from .cache.s3.settings import StoreLocation

    return str(StoreLocation.parse(text.strip()))


store_location.coerceDoc = "An s3://BUCKET/PREFIX location."  # type: ignore[attr-defined]
