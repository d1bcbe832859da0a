"""The index with the shared store behind it: what any replica learned, every replica admits.

The seam's index (``storage.RepositoryIndex``) stays synchronous, and so does its fast path:
``SharedIndex`` answers from the local index (files beside the local tier, ~a stat) and
writes every fact there *and* to the store (a small PUT in the background; failures cost a
later question, never an error). What the local view lacks, the fetcher asks the store for
on its miss path (``holds``, ``tag``, ``media_type_shared``: asynchronous), where it would
otherwise ask the upstream; a fact found there is recorded locally, so it is asked once.

The access rules are the disk cache's: a digest R is known to hold (here or in the store)
is served to a client admitted to R; one stored for another repository needs the upstream's
word first.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger

from ..index import CacheIndex, TagRecord
from .shared import SharedStore

MAX_PENDING = 1000
"""Index writes to the store in flight at most; beyond, they are dropped."""


class SharedIndex:
    """A ``RepositoryIndex``: ``local`` in front, ``shared`` behind."""

    log = Logger()

    def __init__(
        self, local: CacheIndex, shared: SharedStore, *, confirm_every: float = 30.0
    ) -> None:
        self.local = local
        self.shared = shared
        self.pending = 0
        self.confirm_every = confirm_every
        self._confirmed: dict[tuple[str, ...], tuple[str, float]] = {}

    def _background(self, work: Coroutine[Any, Any, object]) -> None:
        if self.pending >= MAX_PENDING:
            work.close()  # a slow store: this fact costs a later question, not memory
            return
        self.pending += 1

        def over(result: object) -> None:
            self.pending -= 1

        ensureDeferred(work).addErrback(
            lambda f: self.log.failure("writing the shared index", f)
        ).addBoth(over)

    # -- the synchronous seam ----------------------------------------------------------------

    def repository_holds(self, route: str, repository: str, digest: str) -> bool:
        return self.local.repository_holds(route, repository, digest)

    def record_repository_digest(self, route: str, repository: str, digest: str) -> None:
        if self.local.repository_holds(route, repository, digest):
            return  # known here: written to the store when it was learned
        self.local.record_repository_digest(route, repository, digest)
        self._background(self.shared.record_repository_digest(route, repository, digest))

    def tag(self, route: str, repository: str, tag: str, accept_key: str) -> TagRecord | None:
        return self.local.tag(route, repository, tag, accept_key)

    def record_tag(
        self, route: str, repository: str, tag: str, accept_key: str, digest: str
    ) -> object:
        record = self.local.record_tag(route, repository, tag, accept_key, digest)
        # Every tag request confirms it upstream; the store hears of it when it changed, or
        # at most every ``confirm_every`` seconds (a PUT per pull would cost more than it
        # tells other replicas).
        key, now = (route, repository, tag, accept_key), self.shared.clock.seconds()
        last = self._confirmed.get(key)
        if last is None or last[0] != digest or now - last[1] >= self.confirm_every:
            if len(self._confirmed) > 100_000:
                self._confirmed.clear()
            self._confirmed[key] = (digest, now)
            self._background(self.shared.record_tag(route, repository, tag, accept_key, digest))
        return record

    def media_type(self, digest: str) -> bytes | None:
        return self.local.media_type(digest)

    def record_media_type(self, digest: str, content_type: bytes) -> None:
        known = self.local.media_type(digest)
        self.local.record_media_type(digest, content_type)
        if known != content_type:
            self._background(self.shared.record_media_type(digest, content_type))

    # -- the asynchronous miss path ----------------------------------------------------------

    async def holds(self, route: str, repository: str, digest: str) -> bool:
        """Whether any replica learned that R holds ``digest`` (recorded here if so)."""
        if self.local.repository_holds(route, repository, digest):
            return True
        if not await self.shared.repository_holds(route, repository, digest):
            return False
        self.local.record_repository_digest(route, repository, digest)
        return True

    async def tag_shared(
        self, route: str, repository: str, tag: str, accept_key: str
    ) -> TagRecord | None:
        """The tag's record as the replica that confirmed it last wrote it."""
        return await self.shared.tag(route, repository, tag, accept_key)

    async def media_type_shared(self, digest: str) -> bytes | None:
        found = self.local.media_type(digest)
        if found is None:
            found = await self.shared.media_type(digest)
            if found is not None:
                self.local.record_media_type(digest, found)
        return found
