"""The index with the shared store behind it: local answers stay synchronous, every fact
also goes to the store, and what another replica learned is found there on a miss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from regproxy.cache.index import CacheIndex, TagRecord
from regproxy.cache.s3.index import SharedIndex

DIGEST = "sha256:" + "cd" * 32


class RecordingShared:
    def __init__(self) -> None:
        self.clock = Clock()
        self.facts: set[tuple[str, ...]] = set()
        self.tags: dict[tuple[str, ...], TagRecord] = {}
        self.media: dict[str, bytes] = {}
        self.writes = 0

    async def record_repository_digest(self, route: str, repository: str, digest: str) -> None:
        self.writes += 1
        self.facts.add((route, repository, digest))

    async def repository_holds(self, route: str, repository: str, digest: str) -> bool:
        return (route, repository, digest) in self.facts

    async def record_tag(
        self, route: str, repository: str, tag: str, accept: str, digest: str
    ) -> None:
        self.writes += 1
        self.tags[(route, repository, tag, accept)] = TagRecord(digest, 1.0)

    async def tag(self, route: str, repository: str, tag: str, accept: str) -> TagRecord | None:
        return self.tags.get((route, repository, tag, accept))

    async def record_media_type(self, digest: str, content_type: bytes) -> None:
        self.writes += 1
        self.media[digest] = content_type

    async def media_type(self, digest: str) -> bytes | None:
        return self.media.get(digest)


def done(coroutine: Any) -> Any:
    deferred: Deferred[Any] = ensureDeferred(coroutine)
    box: list[Any] = []
    deferred.addBoth(box.append)
    assert box, "not synchronous with this fake"
    return box[0]


def index(tmp_path: Path, name: str, shared: RecordingShared) -> SharedIndex:
    return SharedIndex(CacheIndex(str(tmp_path / name), clock=lambda: 100.0), shared)  # type: ignore[arg-type]


def test_facts_go_to_the_store_once_and_another_replica_finds_them(tmp_path: Path) -> None:
    shared = RecordingShared()
    one, two = index(tmp_path, "one", shared), index(tmp_path, "two", shared)
    one.record_repository_digest("r", "app", DIGEST)
    one.record_repository_digest("r", "app", DIGEST)
    assert shared.writes == 1  # known here: not written again
    assert not two.repository_holds("r", "app", DIGEST)  # the synchronous view is local
    assert done(two.holds("r", "app", DIGEST))
    assert two.repository_holds("r", "app", DIGEST)  # recorded locally: asked once
    assert not done(two.holds("r", "other", DIGEST))  # another repository: not admitted


def test_tags_and_media_types_are_shared(tmp_path: Path) -> None:
    shared = RecordingShared()
    one, two = index(tmp_path, "one", shared), index(tmp_path, "two", shared)
    one.record_tag("r", "app", "v1", "accept", DIGEST)
    assert two.tag("r", "app", "v1", "accept") is None
    # The confirming replica's time, not "now": a shared record is no fresher than it is.
    assert done(two.tag_shared("r", "app", "v1", "accept")) == TagRecord(DIGEST, 1.0)
    one.record_media_type(DIGEST, b"application/vnd.oci.image.manifest.v1+json")
    assert done(two.media_type_shared(DIGEST)) == b"application/vnd.oci.image.manifest.v1+json"
    assert two.media_type(DIGEST) == b"application/vnd.oci.image.manifest.v1+json"


def test_tag_confirmations_reach_the_store_when_they_change_or_age(tmp_path: Path) -> None:
    shared = RecordingShared()
    one = index(tmp_path, "one", shared)
    for _ in range(50):  # every pull confirms the tag upstream
        one.record_tag("r", "app", "v1", "accept", DIGEST)
    assert shared.writes == 1
    one.record_tag("r", "app", "v1", "accept", "sha256:" + "ef" * 32)  # moved: at once
    assert shared.writes == 2
    shared.clock.advance(30.0)
    one.record_tag("r", "app", "v1", "accept", "sha256:" + "ef" * 32)  # aged: refreshed
    assert shared.writes == 3
