"""What each option's text means: the typed coerce functions of the option table
(``regproxy.tap``) and of the environment variables (``regproxy.environment``).

Each takes the text as given and returns a typed value, or raises ``ValueError`` with a
sentence that says what to give instead (the caller adds the option's or variable's name).
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import tempfile
from urllib.parse import urlsplit

from twisted.python import usage

from .cache.sizes import parse_size
from .routing.values import (
    blob_redirects,
    credentials_directory,
    readable_file,
    repository_prefix,
    store_location,
    upstream_url,
)
from .server.logs import LogFormat

# A route's values (upstream_url, repository_prefix, readable_file, blob_redirects) are
# routing.values' functions: a routes file's keys are read with the very same ones.
__all__ = [
    "blob_redirects",
    "byte_limit",
    "cache_directory",
    "credentials_directory",
    "directory",
    "endpoint",
    "log_format",
    "network",
    "positive_seconds",
    "public_url",
    "readable_file",
    "repository_prefix",
    "seconds",
    "store_location",
    "upstream_url",
]


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


def temporary_tier() -> str:
    """The local tier of ``--cache-store`` without ``--cache-dir``: a private directory,
    removed when the process exits (what it holds is in the store)."""
    try:
        directory = tempfile.mkdtemp(prefix="regproxy-tier-")
    except OSError as error:
        raise usage.UsageError(
            f"--cache-store needs a local tier and no temporary directory is writable "
            f"({error.strerror}): give --cache-dir, or mount a tmpfs at /tmp"
        ) from None
    atexit.register(shutil.rmtree, directory, True)
    return directory
