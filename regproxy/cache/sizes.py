"""Cache size bounds as operators write them (``50G``, ``500M``) and the default bound."""

from __future__ import annotations

import os
import re

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)

DEFAULT_FREE_SPACE_FRACTION = 0.8


def parse_size(text: str) -> int:
    """``50G`` -> 53687091200. Units are binary (K = 1024), as ``du -h`` and Docker print them.

    ``50GB``, ``50GiB`` and ``50g`` are read the same way; a bare number is bytes.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r} (write it like 50G, 500M or 1048576)")
    number, unit = match.groups()
    size = int(float(number) * _UNITS[unit.upper()])
    if size <= 0:
        raise ValueError(f"a cache size must be positive, not {text!r}")
    return size


def default_max_size(directory: str, fraction: float = DEFAULT_FREE_SPACE_FRACTION) -> int:
    """80 % of the space free at start-up on the file system holding ``directory``.

    Free space as an unprivileged process sees it (``f_bavail``), plus what the cache already
    holds would be fairer, but the cache is usually new or small when this default matters.
    """
    stats = os.statvfs(directory)
    return max(1, int(stats.f_bavail * stats.f_frsize * fraction))


def tier_max_size(max_size: int | None, directory: str, *, store: bool) -> int:
    """The bound of ``directory``: ``max_size`` (``--cache-max-size``), else the default.
    With a shared store ``max_size`` bounds the store; the local tier in front of it keeps
    the default, but never more than the whole cache may hold: a tier larger than the
    store's bound would only keep what the store already evicted."""
    default = default_max_size(directory)
    if max_size is None:
        return default
    return min(max_size, default) if store else max_size
