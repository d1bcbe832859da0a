"""Small objects (manifests, configs) already verified, kept in memory for the next hits.

A manifest hit from disk means an open, a read and a sha256 of its bytes (small objects are
rehashed at every read); the same bytes, once verified, are right for ever, since content
by digest never changes. So a bounded LRU of them answers most manifest hits with no
system call. Who may read them is still decided per request (the index and the access
memory): this holds bytes, not permissions.
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_LIMIT = 32 * 1024 * 1024
ITEM_LIMIT = 64 * 1024


class HotObjects:
    """Verified bytes by digest, least recently used dropped past ``limit`` bytes."""

    def __init__(self, limit: int = DEFAULT_LIMIT, item_limit: int = ITEM_LIMIT) -> None:
        self.limit = limit
        self.item_limit = item_limit
        self.size = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, digest: str) -> bytes | None:
        data = self._items.get(digest)
        if data is not None:
            self._items.move_to_end(digest)
        return data

    def put(self, digest: str, data: bytes) -> None:
        """Keep ``data``, which the caller verified hashes to ``digest``."""
        if len(data) > self.item_limit or digest in self._items:
            return
        self._items[digest] = data
        self.size += len(data)
        while self.size > self.limit:
            _, dropped = self._items.popitem(last=False)
            self.size -= len(dropped)

    def discard(self, digest: str) -> None:
        data = self._items.pop(digest, None)
        if data is not None:
            self.size -= len(data)
