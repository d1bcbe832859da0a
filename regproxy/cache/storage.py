"""What the caching fetcher needs of a store: the seam a second store (object storage)
implements beside the local directory (``store.CacheStore``), without the fetch logic
changing. Downloads and reading along are the store's own business (``download``,
``tail`` for the local directory)."""

from __future__ import annotations

from typing import Protocol

from .index import TagRecord
from .metrics import CacheMetrics
from .reading import StoredObject


class RepositoryIndex(Protocol):
    """Which repository is known to hold which digest, what tags resolved to, and the
    upstream's Content-Type of manifests. Writes never raise: one that fails costs a later
    upstream question, never an error."""

    def repository_holds(self, route: str, repository: str, digest: str) -> bool: ...

    def record_repository_digest(self, route: str, repository: str, digest: str) -> None: ...

    def tag(self, route: str, repository: str, tag: str, accept_key: str) -> TagRecord | None: ...

    def record_tag(
        self, route: str, repository: str, tag: str, accept_key: str, digest: str
    ) -> object: ...

    def media_type(self, digest: str) -> bytes | None: ...

    def record_media_type(self, digest: str, content_type: bytes) -> None: ...


class ObjectStore(Protocol):
    """Verified objects by digest: a final object is always right."""

    @property
    def index(self) -> RepositoryIndex: ...

    @property
    def metrics(self) -> CacheMetrics: ...

    def contains(self, digest: str) -> bool: ...

    def open_object(self, digest: str) -> StoredObject | None:
        """The object, trusted and held open (``close`` it), or None (a miss)."""
