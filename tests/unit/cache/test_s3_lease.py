"""Leases in the shared store, on an in-memory store with conditional writes and a fake
clock: one replica fetches, the others wait for the final key, a dead holder is taken over
by exactly one waiter, judged on the waiter's own clock; the upstream body feeding both the
local download and the upload."""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import Logger

from regproxy.cache.s3.client import ObjectInfo
from regproxy.cache.s3.lease import HeldLease, Waited, wait
from regproxy.cache.s3.shared import LeaseState
from regproxy.cache.sharing import TeeFeed

DIGEST = "sha256:" + "ab" * 32
_etags = itertools.count(1)


class MemoryShared:
    """The parts of ``SharedStore`` leases use: If-None-Match / If-Match semantics."""

    log = Logger()

    def __init__(self, clock: Clock, lease_ttl: float = 30.0) -> None:
        self.clock = clock
        self.lease_ttl = lease_ttl
        self.down = False
        self.leases: dict[str, LeaseState] = {}
        self.objects: set[str] = set()

    async def take_lease(self, digest: str, *, over: str | None = None) -> str | None:
        current = self.leases.get(digest)
        if (over is None and current is not None) or (
            over is not None and (current is None or current.etag != over)
        ):
            return None
        etag = f"e{next(_etags)}"
        self.leases[digest] = LeaseState("me", self.clock.seconds() + self.lease_ttl, etag)
        return etag

    async def renew_lease(self, digest: str, etag: str) -> str | None:
        return await self.take_lease(digest, over=etag)

    async def read_lease(self, digest: str) -> LeaseState | None:
        return self.leases.get(digest)

    async def release_lease(self, digest: str) -> None:
        self.leases.pop(digest, None)

    async def find(self, digest: str) -> ObjectInfo | None:
        return ObjectInfo(digest, 1, "x") if digest in self.objects else None

    def renew_by_other(self, digest: str) -> None:
        state = self.leases[digest]
        self.leases[digest] = LeaseState(state.holder, state.expires, f"e{next(_etags)}")


def started(shared: Any, **kwargs: Any) -> Deferred[tuple[Waited, HeldLease | None]]:
    return ensureDeferred(wait(shared, DIGEST, **kwargs))


def result(deferred: Deferred[Any]) -> Any:
    assert deferred.called, "still waiting"
    box: list[Any] = []
    deferred.addBoth(box.append)
    return box[0]


def test_a_free_lease_is_taken_at_once_and_renewed_until_released() -> None:
    clock = Clock()
    shared = MemoryShared(clock)
    outcome, lease = result(started(shared))
    assert outcome is Waited.LEASED and lease is not None
    first = shared.leases[DIGEST].etag
    clock.advance(10.0)  # ttl / 3
    assert shared.leases[DIGEST].etag != first  # renewed (If-Match the last ETag)
    ensureDeferred(lease.release())
    assert DIGEST not in shared.leases
    clock.advance(60.0)
    assert DIGEST not in shared.leases  # no renewal after the release


def test_a_renewed_lease_is_waited_for_until_the_object_is_stored() -> None:
    clock = Clock()
    shared = MemoryShared(clock)
    result(ensureDeferred(shared.take_lease(DIGEST)))  # another replica holds it
    waiting = started(shared, poll=0.25)
    for _ in range(40):  # 100 s: far past the TTL, but the holder keeps renewing
        clock.advance(2.5)
        if int(clock.seconds()) % 10 == 0:
            shared.renew_by_other(DIGEST)
    assert not waiting.called
    shared.objects.add(DIGEST)
    clock.advance(0.25)
    assert result(waiting) == (Waited.STORED, None)


def test_a_dead_holder_is_taken_over_by_exactly_one_waiter() -> None:
    clock = Clock()
    shared = MemoryShared(clock, lease_ttl=30.0)
    result(ensureDeferred(shared.take_lease(DIGEST)))
    dead = shared.leases[DIGEST].etag
    # Its expiry says long ago: never trusted (the holder's clock), only the ETag's age is.
    shared.leases[DIGEST] = LeaseState("dead", -1e9, dead)
    first, second = started(shared, poll=0.25), started(shared, poll=0.25)
    clock.pump([0.25] * 100)  # 25 s: younger than the TTL as these waiters saw it
    assert not first.called and not second.called
    clock.pump([0.25] * 30)
    outcomes = [d for d in (first, second) if d.called]
    assert len(outcomes) == 1
    outcome, lease = result(outcomes[0])
    assert outcome is Waited.LEASED and lease is not None
    assert shared.leases[DIGEST].etag not in (dead,)
    # The other keeps waiting (the new holder renews), then reads the object.
    clock.pump([0.25] * 200)
    (other,) = [d for d in (first, second) if d is not outcomes[0]]
    assert not other.called
    shared.objects.add(DIGEST)
    clock.advance(0.25)
    assert result(other) == (Waited.STORED, None)
    ensureDeferred(lease.release())


def test_a_released_lease_without_an_object_is_taken() -> None:
    clock = Clock()
    shared = MemoryShared(clock)
    result(ensureDeferred(shared.take_lease(DIGEST)))
    waiting = started(shared, poll=0.25)
    clock.advance(0.25)
    assert not waiting.called
    del shared.leases[DIGEST]  # the holder's upstream fetch failed
    clock.advance(0.25)
    outcome, lease = result(waiting)
    assert outcome is Waited.LEASED
    ensureDeferred(lease.release())


def test_a_failing_store_or_a_long_wait_gives_up() -> None:
    clock = Clock()
    shared = MemoryShared(clock)
    result(ensureDeferred(shared.take_lease(DIGEST)))
    waiting = started(shared, poll=0.25)
    shared.down = True
    clock.advance(0.25)
    clock.advance(0.25)
    assert result(waiting) == (Waited.GIVE_UP, None)
    shared.down = False
    limited = started(shared, poll=1.0, limit=5.0)
    for _ in range(10):
        shared.renew_by_other(DIGEST)
        clock.advance(1.0)
    assert result(limited) == (Waited.GIVE_UP, None)


# -- the upstream body into the download and the upload at once ----------------------------------


class Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


class SlowClient:
    """Parts are acknowledged when the test says so."""

    def __init__(self) -> None:
        self.parts: list[Deferred[str]] = []

    async def create_multipart(self, key: str) -> str:
        return "upload-id"

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> Deferred[str]:
        part: Deferred[str] = Deferred()
        self.parts.append(part)
        return part


class FakeDownload:
    def __init__(self) -> None:
        self.written = 0
        self.stop_upstream: Any = None
        self.pause_upstream: Any = None
        self.resume_upstream: Any = None
        self.upstream_paused = False

    def write(self, data: bytes) -> None:
        self.written += len(data)


class FakeShared:
    def __init__(self) -> None:
        self.client = SlowClient()

    def object_key(self, digest: str) -> str:
        return "blobs/" + digest


def test_parts_in_flight_pause_the_upstream_and_never_once_its_body_is_over() -> None:
    shared, download, producer = FakeShared(), FakeDownload(), Producer()
    feed = TeeFeed(download, shared, DIGEST, None)  # type: ignore[arg-type]
    feed.upload.part_size = 10
    feed.registerProducer(producer, True)
    feed.write(b"x" * 20)  # two parts in flight: the most allowed
    assert download.written == 20
    assert producer.paused == 1
    shared.client.parts[0].callback("etag1")
    assert producer.resumed == 1
    # The download's own hold (readers behind, no local file) and the upload's add up.
    download.pause_upstream()
    feed.write(b"x" * 10)
    assert producer.paused == 2
    shared.client.parts[1].callback("etag2")
    assert producer.resumed == 1  # the download still holds it
    download.resume_upstream()
    assert producer.resumed == 2
    # The body ended (its connection may serve another request now): the upload's last
    # parts must not pause it any more.
    feed.unregisterProducer()
    feed.upload.write(b"y" * 20)
    assert producer.paused == 2
