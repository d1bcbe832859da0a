"""Digests as the cache names them."""

from __future__ import annotations

import re

_SHA256 = re.compile(r"sha256:([a-f0-9]{64})")


class NotCacheable(ValueError):
    """A digest the cache does not store (only sha256 objects are cached)."""


def sha256_hex(digest: str) -> str:
    """``sha256:<64 lowercase hex>`` -> the hex; anything else raises ``NotCacheable``."""
    match = _SHA256.fullmatch(digest)
    if match is None:
        raise NotCacheable(f"not a cacheable digest: {digest[:80]!r}")
    return match.group(1)


def is_cacheable(digest: str) -> bool:
    return _SHA256.fullmatch(digest) is not None
