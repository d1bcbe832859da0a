"""Keeping the shared store under ``--cache-max-size``: least recently served first, by one
replica at a time.

Every replica checks the total (``usage``: one small GET) every ``every`` seconds (default
300, each wait drawn between 0.8x and 1.2x so replicas started together spread out), and
when an upload it completed pushed the total over the bound. Over the bound, or when the
total was not counted for a day (or ever), it runs eviction under the lease
``leases/evict`` (the same conditional-PUT lease as downloads, renewed while it runs; a
holder that stopped renewing is taken over once its ETag did not change for the lease TTL
on this replica's clock). A run lists ``blobs/`` and ``index/served/`` (what sizes and
serve times are), deletes objects least recently served first until the total is
``slack`` below the bound, each with its served record, and writes the total it found.

Never deleted:

- what was served in the last ``min_idle`` seconds (default 1200) by any replica: served
  records may be ``served_every`` (600) old, a redirect's URL is valid for 300 s and a
  replica remembers for 60 s that the store holds a digest; so an object a client is being
  sent to, or reading through another replica, is not removed under it (only a read
  running longer than ``min_idle - served_every`` could be);
- what this replica is reading from the store or downloading right now (``busy``).

When only such objects are left, the store stays over the bound and a warning says so.
The index's other facts about an evicted digest (which repositories hold it, a manifest's
media type) stay: they say nothing about where bytes are, only who may read them, and a
digest the store no longer holds is fetched from the upstream again like any miss.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from ...upstream.singleflight import SingleFlight
from ..layout import is_hex
from .client import ObjectInfo
from .lease import HeldLease
from .shared import SharedStore
from .usage import StoreUsage

RECOUNT_EVERY = 86400.0
"""Seconds after which the total is counted again by a listing even below the bound."""


@attrs.frozen
class Stored:
    """An object as a run sees it: its size and when it was last served (store clock)."""

    size: int
    last_served: float


@attrs.frozen
class Plan:
    total: int  # bytes under blobs/ as listed
    evict: tuple[str, ...]  # hex digests, least recently served first
    remaining: int  # bytes once they are gone


def plan(
    objects: Mapping[str, Stored],
    *,
    bound: int,
    target: int,
    idle_before: float,
    busy: Callable[[str], bool],
) -> Plan:
    """Which objects to delete: nothing at or under ``bound``; over it, the least recently
    served first until ``target``, never one served at or after ``idle_before`` nor a
    ``busy`` one."""
    total = sum(item.size for item in objects.values())
    remaining = total
    chosen: list[str] = []
    if total > bound:
        for hex_, item in sorted(objects.items(), key=lambda pair: (pair[1].last_served, pair[0])):
            if remaining <= target or item.last_served >= idle_before:
                break  # sorted: every later one was served as recently or more
            if busy("sha256:" + hex_):
                continue
            chosen.append(hex_)
            remaining -= item.size
    return Plan(total, tuple(chosen), remaining)


def _hex_of(key: str) -> str | None:
    name = key.rsplit("/", 1)[-1]
    return name if len(name) == 64 and is_hex(name) else None


def stored_objects(blobs: list[ObjectInfo], served: list[ObjectInfo]) -> dict[str, Stored]:
    """Listings joined: an object was last served when its served record or, never served
    since, its own upload was last written."""
    times: dict[str, float] = {}
    for info in served:
        hex_ = _hex_of(info.key)
        if hex_ is not None:
            times[hex_] = info.modified
    found: dict[str, Stored] = {}
    for info in blobs:
        hex_ = _hex_of(info.key)
        if hex_ is not None:
            found[hex_] = Stored(info.size, max(info.modified, times.get(hex_, 0.0)))
    return found


class StoreEvictor(Service):
    """The periodic check and the eviction runs of one replica."""

    log = Logger()

    def __init__(
        self,
        shared: SharedStore,
        usage: StoreUsage,
        *,
        max_size: int,
        busy: Callable[[str], bool] = lambda digest: False,
        on_evicted: Callable[[str], None] = lambda digest: None,
        every: float = 300.0,
        min_idle: float = 1200.0,
        slack: float = 0.1,
        recount_every: float = RECOUNT_EVERY,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.shared = shared
        self.usage = usage
        self.max_size = max_size
        self.target = int(max_size * (1 - slack))
        self.busy = busy
        self.on_evicted = on_evicted
        self.every = every
        self.min_idle = min_idle
        self.recount_every = recount_every
        self.jitter = jitter
        self.lease_key = f"{shared.prefix}leases/evict"
        self._runs: SingleFlight[str, Plan | None] = SingleFlight()
        self.lease: HeldLease | None = None
        self.evicted = 0
        self._next: IDelayedCall | None = None
        self._seen: tuple[str, float] | None = None  # (lease ETag, first seen) of another's
        self._warned_at = float("-inf")

    # -- when ----------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # Soon after start (a first count of a new store), spread over a tenth of the period.
        self._schedule(self.every * 0.1 * self.jitter())

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        lease = self.lease
        if lease is not None:
            return ensureDeferred(lease.release())
        return None

    def _schedule(self, delay: float) -> None:
        self._next = self.shared.clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._next = None
        self.check().addBoth(lambda _: self._again())

    def _again(self) -> None:
        if self.running:
            self._schedule(self.every * (0.8 + 0.4 * self.jitter()))

    def check(self) -> Deferred[Plan | None]:
        """Read the total; run eviction if it is over the bound or due for a recount."""
        return ensureDeferred(self._check())

    async def _check(self) -> Plan | None:
        record = await self.usage.total()
        if self.shared.down:
            return None
        now = self.shared.clock.seconds()
        if (
            record is None
            or record.bytes > self.max_size
            or now - record.counted_at >= self.recount_every
        ):
            return await self.run()
        return None

    def over(self, total: int | None) -> None:
        """An upload this replica completed brought the total to ``total``."""
        if total is not None and total > self.max_size:
            self.run_soon()

    def run_soon(self) -> Deferred[Plan | None]:
        return ensureDeferred(self.run())

    # -- a run ---------------------------------------------------------------------------------

    async def run(self) -> Plan | None:
        """One eviction run if this replica gets the lease (None otherwise, or when the store
        fails); one at a time in this replica."""
        return await self._runs.run("evict", self._leased)

    async def _leased(self) -> Plan | None:
        lease = await self._take()
        if lease is None:
            return None
        self.lease = lease
        try:
            return await self._evict(lease)
        finally:
            self.lease = None
            await lease.release()

    async def _take(self) -> HeldLease | None:
        shared = self.shared
        etag = await shared.take_lease_at(self.lease_key)
        if etag is None and not shared.down:
            state = await shared.read_lease_at(self.lease_key)
            now = shared.clock.seconds()
            if state is None:
                etag = await shared.take_lease_at(self.lease_key)  # released meanwhile
            elif self._seen is None or self._seen[0] != state.etag:
                self._seen = (state.etag, now)
            elif now - self._seen[1] >= shared.lease_ttl:
                self.log.warn(
                    "the eviction lease of {holder} expired: taking it over", holder=state.holder
                )
                etag = await shared.take_lease_at(self.lease_key, over=state.etag)
        if etag is None:
            return None
        self._seen = None
        return HeldLease(shared, "eviction", etag, key=self.lease_key)

    async def _evict(self, lease: HeldLease) -> Plan | None:
        shared = self.shared
        # Read again under the lease, just before listing: what is added from now on is
        # kept on top of the count (``usage.counted``).
        before = await self.usage.total()
        prefix = shared.prefix
        blobs = await shared.guarded("list", lambda: shared.client.list(prefix + "blobs/"), None)
        served = await shared.guarded(
            "list", lambda: shared.client.list(prefix + "index/served/"), None
        )
        if blobs is None or served is None:
            return None
        objects = stored_objects(blobs, served)
        now = shared.clock.seconds()
        chosen = plan(
            objects,
            bound=self.max_size,
            target=self.target,
            idle_before=now - self.min_idle,
            busy=self.busy,
        )
        freed = 0
        for hex_ in chosen.evict:
            digest = "sha256:" + hex_
            if lease.lost or shared.down or self.busy(digest):
                break  # another replica took over, or the store fails: stop here
            if await self._delete(digest) is None:
                break
            freed += objects[hex_].size
            self.evicted += 1
            self.on_evicted(digest)
            self.usage.forget(digest)
        await self._orphans(objects, served)
        total = chosen.total - freed
        await self.usage.counted(total, before)
        if freed:
            self.log.info(
                "object store: evicted {count} objects ({freed} bytes) least recently served;"
                " {total} bytes stored, bound {bound}",
                count=len(chosen.evict),
                freed=freed,
                total=total,
                bound=self.max_size,
            )
        if total > self.max_size and now - self._warned_at > 3600:
            self._warned_at = now
            self.log.warn(
                "object store over its bound: {total} bytes > {bound}; the rest was served"
                " in the last {idle} s or is being read",
                total=total,
                bound=self.max_size,
                idle=self.min_idle,
            )
        return attrs.evolve(chosen, remaining=total)

    async def _delete(self, digest: str) -> bool | None:
        shared = self.shared
        key = shared.object_key(digest)

        async def delete() -> bool:
            await shared.client.delete(key)
            await shared.client.delete(shared.served_key(digest))
            return True

        return await shared.guarded("evict", delete, None)

    async def _orphans(self, objects: Mapping[str, Stored], served: list[ObjectInfo]) -> None:
        """Served records of objects no longer stored (evicted, or removed by a lifecycle
        rule): deleted, or they would pile up. One written while the listing ran for an
        object completed since may go too: the object's own Last-Modified stands in."""
        shared = self.shared
        for info in served:
            hex_ = _hex_of(info.key)
            if hex_ is None or hex_ in objects:
                continue
            if await shared.guarded("evict", _deleting(shared, info.key), None) is None:
                return


def _deleting(shared: SharedStore, key: str) -> Callable[[], Coroutine[Any, Any, bool]]:
    async def delete() -> bool:
        await shared.client.delete(key)
        return True

    return delete
