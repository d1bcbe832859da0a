"""The shared store's size bound on an in-memory S3 (conditional PUTs, listings with
Last-Modified from a fake clock) under the real ``SharedStore``: least recently served
first, one replica at a time under ``leases/evict``, served records written at most every
``served_every`` seconds, the total kept by conditional writes and recounted by each run."""

from __future__ import annotations

import itertools
import json
from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from regproxy.cache.s3.client import ObjectInfo, PreconditionFailed, S3Error
from regproxy.cache.s3.evict import Stored, StoreEvictor, plan
from regproxy.cache.s3.settings import StoreLocation
from regproxy.cache.s3.shared import SharedStore
from regproxy.cache.s3.usage import StoreUsage

_etags = itertools.count(1)
MIB = 1 << 20


@attrs.define
class Entry:
    data: bytes
    etag: str
    modified: float


@attrs.define
class Response:
    code: int
    headers: Headers
    data: bytes


class MemoryS3:
    """The calls ``SharedStore``, ``StoreUsage`` and ``StoreEvictor`` make, in memory."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.location = StoreLocation("bucket", "c/")
        self.objects: dict[str, Entry] = {}
        self.puts: list[str] = []
        self.deletes: list[str] = []
        self.lists = 0
        # Called before a conditional PUT lands (another replica writing in between).
        self.before_put: Any = None

    def add(self, key: str, size: int, at: float) -> None:
        self.objects[key] = Entry(b"\0" * size, f"e{next(_etags)}", at)

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        content_type: str = "",
    ) -> str:
        if self.before_put is not None:
            hook, self.before_put = self.before_put, None
            await hook(key)
        current = self.objects.get(key)
        if if_none_match and current is not None:
            raise PreconditionFailed(412)
        if if_match is not None and (current is None or current.etag != if_match):
            raise PreconditionFailed(412)
        etag = f"e{next(_etags)}"
        self.objects[key] = Entry(data, etag, self.clock.seconds())
        self.puts.append(key)
        return etag

    async def get(self, key: str) -> Response | None:
        entry = self.objects.get(key)
        if entry is None:
            return None
        return Response(200, Headers({b"etag": [f'"{entry.etag}"'.encode()]}), entry.data)

    async def read_body(self, response: Response) -> bytes:
        return response.data

    async def delete(self, key: str) -> None:
        self.deletes.append(key)
        self.objects.pop(key, None)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        self.lists += 1
        return [
            ObjectInfo(key, len(entry.data), entry.etag, entry.modified)
            for key, entry in sorted(self.objects.items())
            if key.startswith(prefix)
        ]


def hex_of(n: int) -> str:
    return f"{n:02x}" * 32


def digest(n: int) -> str:
    return "sha256:" + hex_of(n)


def blob_key(n: int) -> str:
    return f"c/blobs/sha256/{hex_of(n)[:2]}/{hex_of(n)}"


def result(deferred: Deferred[Any]) -> Any:
    assert deferred.called, "still running"
    box: list[Any] = []
    deferred.addBoth(box.append)
    return box[0]


def run(coroutine: Any) -> Any:
    return result(ensureDeferred(coroutine))


class Replica:
    def __init__(self, s3: MemoryS3, clock: Clock, name: str, **kwargs: Any) -> None:
        self.shared = SharedStore(s3, clock=clock, replica=name)  # type: ignore[arg-type]
        self.usage = StoreUsage(self.shared, served_every=kwargs.pop("served_every", 600.0))
        self.busy: set[str] = set()
        self.evictor = StoreEvictor(
            self.shared,
            self.usage,
            busy=self.busy.__contains__,
            jitter=lambda: 0.5,
            **{"max_size": 10 * MIB, "min_idle": 100.0, **kwargs},
        )


def filled(clock: Clock, count: int = 8) -> MemoryS3:
    """``count`` objects of 2 MiB, object n uploaded at time 10 n."""
    s3 = MemoryS3(clock)
    for n in range(count):
        s3.add(blob_key(n), 2 * MIB, 10.0 * n)
    return s3


def stored(s3: MemoryS3) -> list[int]:
    return [n for n in range(256) if blob_key(n) in s3.objects]


def total(s3: MemoryS3) -> int:
    return int(json.loads(s3.objects["c/index/size"].data)["bytes"])


def test_the_least_recently_served_go_first_until_below_the_bound() -> None:
    clock = Clock()
    s3 = filled(clock)  # 16 MiB against a bound of 10 MiB
    clock.advance(1000.0)
    one = Replica(s3, clock, "one")
    # Objects 0 and 1 are the oldest uploads but were served since: they stay.
    one.usage.served(digest(0))
    one.usage.served(digest(1))
    clock.advance(500.0)  # past min_idle for everything
    done = run(one.evictor.run())
    # 16 MiB -> at most 9 MiB (10 % under the bound): 2, 3, 4 and 5 go (least recent).
    assert done.evict == tuple(hex_of(n) for n in (2, 3, 4, 5))
    assert stored(s3) == [0, 1, 6, 7]
    assert total(s3) == 8 * MIB
    assert "c/leases/evict" not in s3.objects  # released
    assert f"c/index/served/{hex_of(0)}" in s3.objects


def test_served_records_are_written_at_most_every_served_every_seconds() -> None:
    clock = Clock()
    s3 = MemoryS3(clock)
    one = Replica(s3, clock, "one", served_every=600.0)
    for _ in range(50):
        one.usage.served(digest(1))
        clock.advance(10.0)  # 500 s of hits
    assert s3.puts.count(f"c/index/served/{hex_of(1)}") == 1
    clock.advance(100.0)
    one.usage.served(digest(1))
    assert s3.puts.count(f"c/index/served/{hex_of(1)}") == 2
    # A completed upload is its own first serve (its Last-Modified): no record at once.
    one.usage.uploaded(digest(2))
    one.usage.served(digest(2))
    assert f"c/index/served/{hex_of(2)}" not in s3.objects


def test_nothing_served_within_min_idle_nor_read_here_is_evicted() -> None:
    clock = Clock()
    s3 = filled(clock)
    clock.advance(75.0)  # objects 0..2 idle for 55 s or more, 3..7 more recent
    one = Replica(s3, clock, "one", min_idle=50.0)
    one.busy.add(digest(1))  # being read from the store by this replica
    done = run(one.evictor.run())
    assert done.evict == (hex_of(0), hex_of(2))
    assert stored(s3) == [1, 3, 4, 5, 6, 7]
    assert total(s3) == 12 * MIB  # over the bound: the rest is protected


def test_under_the_bound_nothing_is_deleted_and_the_total_is_recounted() -> None:
    clock = Clock()
    s3 = filled(clock, count=3)
    s3.add("c/index/served/" + hex_of(9), 0, 0.0)  # an orphan: its object is gone
    clock.advance(1000.0)
    one = Replica(s3, clock, "one")
    done = run(one.evictor.run())
    assert done.evict == () and stored(s3) == [0, 1, 2]
    assert total(s3) == 6 * MIB
    assert "c/index/served/" + hex_of(9) not in s3.objects


def test_one_replica_at_a_time_and_a_dead_holder_is_taken_over() -> None:
    clock = Clock()
    s3 = filled(clock)
    clock.advance(1000.0)
    one, two = Replica(s3, clock, "one"), Replica(s3, clock, "two")
    etag = run(two.shared.take_lease_at("c/leases/evict"))
    assert run(one.evictor.run()) is None  # two holds the lease
    assert stored(s3) == list(range(8))
    clock.advance(20.0)
    etag = run(two.shared.take_lease_at("c/leases/evict", over=etag))  # two renews
    clock.advance(20.0)
    assert run(one.evictor.run()) is None
    clock.advance(31.0)  # two stopped renewing: dead after the TTL on one's clock
    assert run(one.evictor.run()) is not None
    assert stored(s3) == [4, 5, 6, 7]
    assert "c/leases/evict" not in s3.objects


def test_the_lease_is_renewed_during_a_long_run_and_a_lost_lease_stops_it() -> None:
    clock = Clock()
    s3 = filled(clock)
    clock.advance(1000.0)
    one = Replica(s3, clock, "one")
    deletes: list[Deferred[None]] = []
    real_delete = s3.delete

    async def slow_delete(key: str) -> None:
        if key.startswith("c/blobs/"):
            waiting: Deferred[None] = Deferred()
            deletes.append(waiting)
            await waiting
        await real_delete(key)

    s3.delete = slow_delete  # type: ignore[method-assign]
    running = ensureDeferred(one.evictor.run())
    first = s3.objects["c/leases/evict"].etag
    clock.advance(10.0)  # ttl / 3
    assert s3.objects["c/leases/evict"].etag != first  # renewed
    # Another replica takes the lease over (this one was judged dead): stop after this one.
    s3.objects["c/leases/evict"].etag = "stolen"
    clock.advance(10.0)
    deletes.pop().callback(None)
    assert result(running) is not None
    assert len(stored(s3)) == 7  # one deleted, then the run stopped
    assert s3.objects["c/leases/evict"].etag == "stolen"  # not released: not ours


def test_adds_are_conditional_and_survive_a_concurrent_writer() -> None:
    clock = Clock()
    s3 = MemoryS3(clock)
    one, two = Replica(s3, clock, "one"), Replica(s3, clock, "two")
    assert run(one.usage.add(3 * MIB)) == 3 * MIB

    async def meanwhile(key: str) -> None:
        await two.usage.add(5 * MIB)  # lands between one's read and one's PUT

    s3.before_put = meanwhile
    assert run(one.usage.add(4 * MIB)) == 12 * MIB
    assert total(s3) == 12 * MIB


def test_a_recount_keeps_what_was_added_while_it_listed() -> None:
    clock = Clock()
    s3 = filled(clock, count=2)
    one, two = Replica(s3, clock, "one"), Replica(s3, clock, "two")
    run(one.usage.add(100 * MIB))  # wrong (a lifecycle rule removed objects)
    real_list = s3.list

    async def listing(prefix: str) -> list[ObjectInfo]:
        found = await real_list(prefix)
        if prefix.endswith("blobs/"):
            await two.usage.add(MIB)  # an upload completed meanwhile
        return found

    s3.list = listing  # type: ignore[method-assign]
    run(one.evictor.run())
    assert total(s3) == 5 * MIB


def test_an_upload_over_the_bound_runs_eviction_and_the_period_checks() -> None:
    clock = Clock()
    s3 = filled(clock, count=4)
    clock.advance(1000.0)
    one = Replica(s3, clock, "one", every=300.0)
    run(one.usage.counted(8 * MIB, None))
    assert s3.lists == 0
    total_now = run(one.usage.add(4 * MIB))  # object 9 completed: 12 MiB
    s3.add(blob_key(9), 4 * MIB, clock.seconds())
    one.evictor.over(total_now)
    assert stored(s3) == [2, 3, 9]
    # The periodic check reads the total only, while under the bound and recently counted.
    one.evictor.startService()
    lists = s3.lists
    clock.advance(15.0)  # first check: a tenth of the period, spread
    clock.advance(300.0)
    assert s3.lists == lists
    s3.add(blob_key(10), 6 * MIB, clock.seconds())
    run(one.usage.add(6 * MIB))  # another replica's upload: this one hears at its check
    clock.advance(1000.0)
    clock.advance(300.0)
    assert s3.lists > lists and 10 in stored(s3) and 2 not in stored(s3)
    one.evictor.stopService()
    assert not clock.getDelayedCalls()


def test_a_day_old_count_is_recounted_under_the_bound() -> None:
    clock = Clock()
    s3 = filled(clock, count=1)
    one = Replica(s3, clock, "one")
    run(one.usage.counted(2 * MIB, None))
    result(one.evictor.check())
    assert s3.lists == 0
    clock.advance(86400.0)
    result(one.evictor.check())
    assert s3.lists == 2  # blobs/ and index/served/


def test_a_failing_store_evicts_nothing() -> None:
    clock = Clock()
    s3 = filled(clock)
    clock.advance(1000.0)
    one = Replica(s3, clock, "one")

    async def broken(prefix: str) -> list[ObjectInfo]:
        raise ConnectionError("store down")

    s3.list = broken  # type: ignore[method-assign]
    assert run(one.evictor.run()) is None
    assert stored(s3) == list(range(8))


objects_strategy = st.dictionaries(
    st.integers(0, 255).map(hex_of),
    st.builds(Stored, st.integers(0, 100), st.floats(0, 1000, allow_nan=False)),
    max_size=30,
)


@given(
    objects_strategy,
    st.integers(0, 2000),
    st.floats(0, 1000, allow_nan=False),
    st.sets(st.integers(0, 255).map(hex_of)),
)
def test_plan_is_least_recently_served_first_and_never_touches_the_protected(
    objects: dict[str, Stored], bound: int, idle_before: float, busy: set[str]
) -> None:
    target = bound * 9 // 10
    chosen = plan(
        objects,
        bound=bound,
        target=target,
        idle_before=idle_before,
        busy=lambda d: d.removeprefix("sha256:") in busy,
    )
    total_size = sum(o.size for o in objects.values())
    assert chosen.total == total_size
    assert chosen.remaining == total_size - sum(objects[h].size for h in chosen.evict)
    if total_size <= bound:
        assert chosen.evict == ()
    for hex_ in chosen.evict:
        assert hex_ not in busy and objects[hex_].last_served < idle_before
    kept = [h for h in objects if h not in chosen.evict and h not in busy]
    evictable_kept = [h for h in kept if objects[h].last_served < idle_before]
    if chosen.evict and evictable_kept:
        # Stopped only because the target was reached, and never skipped an older one.
        assert chosen.remaining <= target or not evictable_kept
        newest_evicted = max(objects[h].last_served for h in chosen.evict)
        assert all(objects[h].last_served >= newest_evicted for h in evictable_kept)
    if total_size > bound and chosen.remaining > target:
        assert evictable_kept == []  # everything left over is protected


def test_a_500_racing_write_of_the_total_is_retried_without_marking_the_store_down() -> None:
    clock = Clock()
    s3 = MemoryS3(clock)
    one = Replica(s3, clock, "one")
    run(one.usage.add(MIB))
    failures = [S3Error(500, "UnknownError")] * 2

    async def racing(key: str) -> None:
        if failures:
            s3.before_put = racing
            raise failures.pop()

    s3.before_put = racing
    adding = ensureDeferred(one.usage.add(MIB))
    for _ in range(10):
        clock.advance(0.1)  # the retries' short delays
    assert result(adding) == 2 * MIB
    assert not one.shared.down and total(s3) == 2 * MIB
