"""One upstream fetch per blob for the whole cluster: leases in the shared store.

A replica about to fetch a blob from the upstream first creates ``leases/sha256/<hex>`` with
``If-None-Match: *``: of all replicas trying at once exactly one succeeds. The lease names
its holder and an expiry, and the holder rewrites it (``If-Match`` its last ETag) every
``ttl / 3`` seconds while it downloads; it deletes it once the object was completed (or the
download failed).

The others wait for the final key (``wait``), and do not read from the leaseholder. Why:
replicas need no address of one another (on Cloud Run or behind a load balancer they have
none that is reachable), the store stays the only thing they share, and a reader can never
be handed bytes the store will not hold; what it costs is that the waiters' clients start
receiving when the object is complete, not as it arrives (for a 256 MiB blob read at
store speed afterwards, a few tenths of the fetch time).

Expiry is judged on the waiter's own clock, never the holder's: a lease whose ETag did not
change for ``ttl`` seconds, as seen by the waiter, is dead (clocks of replicas may differ;
a holder that renews changes the ETag). Then one waiter takes it over with ``If-Match`` that
ETag: again exactly one succeeds, and fetches; the rest go on waiting.
"""

from __future__ import annotations

import enum

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from .shared import SharedStore


class Waited(enum.Enum):
    STORED = "stored"  # the final key exists: read it from the store
    LEASED = "leased"  # this replica now holds the lease: fetch from the upstream
    GIVE_UP = "give up"  # the store failed, or waiting took too long: fetch without it


class HeldLease:
    """A lease this replica holds: renewed until ``release``. ``key``: a lease that is not a
    digest's (``leases/evict``); ``digest`` then only names it in logs."""

    log = Logger()

    def __init__(
        self, shared: SharedStore, digest: str, etag: str, key: str | None = None
    ) -> None:
        self.shared = shared
        self.digest = digest
        self.key = key
        self.etag: str | None = etag
        self.released = False
        self.claimed = False  # a download took it
        self._renewal = LoopingCall(self._renew)
        self._renewal.clock = shared.clock
        self._renewal.start(max(shared.lease_ttl / 3, 0.05), now=False)

    async def _renew_once(self) -> None:
        if self.etag is None or self.released:
            return
        if self.key is None:
            etag = await self.shared.renew_lease(self.digest, self.etag)
        else:
            etag = await self.shared.take_lease_at(self.key, over=self.etag)
        if etag is None and not self.released and not self.shared.down:
            self.log.warn(
                "lost the lease on {digest} (renewed too late?): another replica may fetch it",
                digest=self.digest,
            )
        self.etag = etag

    def _renew(self) -> object:
        return ensureDeferred(self._renew_once()).addErrback(
            lambda f: self.log.failure("renewing a lease", f)
        )

    @property
    def lost(self) -> bool:
        """Taken over by another replica (or a renewal failed): no longer this one's."""
        return self.etag is None and not self.released

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self._renewal.running:
            self._renewal.stop()
        if self.etag is not None:
            if self.key is None:
                await self.shared.release_lease(self.digest)
            else:
                await self.shared.release_lease_at(self.key)


async def wait(
    shared: SharedStore,
    digest: str,
    *,
    poll: float = 0.25,
    limit: float = 600.0,
) -> tuple[Waited, HeldLease | None]:
    """Take the lease of ``digest`` or wait until the object is stored, taking the lease
    when it is released without an object or its holder stopped renewing it; ``GIVE_UP``
    when the store fails or after ``limit`` seconds. (The caller looked the object up just
    before: the first step is the lease.)"""
    clock: IReactorTime = shared.clock
    began = clock.seconds()
    seen: tuple[str, float] | None = None  # (lease ETag, when first seen with it)
    etag = await shared.take_lease(digest)
    while True:
        if etag is not None:
            return Waited.LEASED, HeldLease(shared, digest, etag)
        if shared.down or clock.seconds() - began >= limit:
            return Waited.GIVE_UP, None
        await deferLater(clock, poll, lambda: None)
        if await shared.find(digest) is not None:
            return Waited.STORED, None
        state = await shared.read_lease(digest)
        if state is None:
            # Released: by a holder that failed (the object would be there otherwise).
            etag = await shared.take_lease(digest)
            continue
        now = clock.seconds()
        if seen is None or seen[0] != state.etag:
            seen = (state.etag, now)
        elif now - seen[1] >= shared.lease_ttl:
            etag = await shared.take_lease(digest, over=state.etag)
            seen = None
            if etag is not None:
                shared.log.warn(
                    "the lease of {holder} on {digest} expired: taking over the download",
                    holder=state.holder,
                    digest=digest,
                )
