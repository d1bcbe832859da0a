"""What eviction needs to know, kept in the store's index: when each object was last served,
and how many bytes the store holds.

Served: every time this replica serves a digest (from the local tier, from the store, or by
a redirect to it) it rewrites the empty object ``index/served/<hex>``, whose Last-Modified
(the store's own clock, the same for every replica) is the time of that serve. Hits must
not become a PUT each, so a replica rewrites it at most once every ``served_every`` seconds
per digest (default 600): the recorded time may be up to that much older than the last
serve, which is why eviction leaves alone what was served more recently than its
``min_idle`` (``evict``). The completed upload of an object counts as its first serve (the
object's own Last-Modified).

The total: ``index/size`` holds ``{"bytes", "counted_at"}``. The replica that completes an
upload adds the object's size with a conditional PUT (``If-Match`` the ETag it read, retried
when another replica wrote between), so the total needs no listing of the bucket; eviction
sets it from its own listing (a recount) each time it runs, and at least daily. What it can
miss until then: an adder killed between completing and adding, objects a bucket lifecycle
rule removed (both only make the next eviction run start sooner or later).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .client import PreconditionFailed, S3Error
from .shared import SharedStore

MAX_PENDING = 1000
"""Served records being written at most; beyond, they are dropped (a slow store)."""
REMEMBERED = 100_000
"""Digests whose last served write is remembered; beyond, the memory starts over."""
ATTEMPTS = 8
"""Conditional writes of the total tried before giving up (the next recount corrects it)."""
RETRY_DELAY = 0.05
"""Seconds before an index request the store answered 5xx is tried again (times the try)."""

T = TypeVar("T")


@attrs.frozen
class SizeRecord:
    """``index/size`` as read: the bytes under ``blobs/``, when last counted by a listing
    (the counter's clock), and its ETag for a conditional rewrite."""

    bytes: int
    counted_at: float
    etag: str


class StoreUsage:
    """The served records and the total of one shared store."""

    log = Logger()

    def __init__(self, shared: SharedStore, *, served_every: float = 600.0) -> None:
        self.shared = shared
        self.served_every = served_every
        self.pending = 0
        self._written: dict[str, float] = {}

    @property
    def size_key(self) -> str:
        return f"{self.shared.prefix}index/size"

    # -- served ------------------------------------------------------------------------------

    def served(self, digest: str) -> None:
        """``digest`` was served now: its record is rewritten unless this replica did so in
        the last ``served_every`` seconds."""
        now = self.shared.clock.seconds()
        last = self._written.get(digest)
        if last is not None and now - last < self.served_every:
            return
        if len(self._written) >= REMEMBERED:
            self._written.clear()
        self._written[digest] = now
        key, put, clock = self.shared.served_key(digest), self.shared.client.put, self.shared.clock
        self._background(
            self.shared.guarded("served", lambda: _retrying(clock, lambda: put(key, b"")), "")
        )

    def uploaded(self, digest: str) -> None:
        """This replica completed ``digest``'s upload: its Last-Modified is its serve."""
        self._written[digest] = self.shared.clock.seconds()

    def forget(self, digest: str) -> None:
        self._written.pop(digest, None)

    def _background(self, work: Coroutine[Any, Any, object]) -> None:
        if self.pending >= MAX_PENDING:
            work.close()
            return
        self.pending += 1

        def over(result: object) -> None:
            self.pending -= 1

        ensureDeferred(work).addErrback(
            lambda f: self.log.failure("writing a served record", f)
        ).addBoth(over)

    # -- the total ---------------------------------------------------------------------------

    async def total(self) -> SizeRecord | None:
        """The counter, or None: never counted (or unreadable, or the store failing)."""
        clock = self.shared.clock
        return await self.shared.guarded("size", lambda: _retrying(clock, self._read), None)

    async def _read(self) -> SizeRecord | None:
        response = await self.shared.client.get(self.size_key)
        if response is None:
            return None
        etag = response.headers.getRawHeaders(b"etag", [b""])[0].decode().strip('"')
        data = await self.shared.client.read_body(response)
        try:
            fields = json.loads(data)
            return SizeRecord(int(fields["bytes"]), float(fields["counted_at"]), etag)
        except (ValueError, KeyError, TypeError):
            return SizeRecord(0, 0.0, etag)  # unreadable: counted again soon

    async def add(self, delta: int) -> int | None:
        """Add ``delta`` bytes to the total; the new total, or None (not written)."""

        def change(current: SizeRecord | None) -> tuple[int, float]:
            if current is None:
                return max(delta, 0), 0.0  # never counted: a recount comes soon
            return max(current.bytes + delta, 0), current.counted_at

        return await self._rewrite(change)

    async def counted(self, counted: int, before: SizeRecord | None) -> int | None:
        """A listing found ``counted`` bytes, the counter having been ``before`` when it
        started: write that, plus what other replicas added since (an object completed
        while the listing ran may so be counted twice until the next recount: safe, it
        only brings that recount sooner)."""
        now = self.shared.clock.seconds()
        base = before.bytes if before is not None else 0

        def change(current: SizeRecord | None) -> tuple[int, float]:
            added = (current.bytes - base) if current is not None and before is not None else 0
            return max(counted + max(added, 0), 0), now

        return await self._rewrite(change)

    async def _rewrite(
        self, change: Callable[[SizeRecord | None], tuple[int, float]]
    ) -> int | None:
        client, clock = self.shared.client, self.shared.clock

        async def attempts() -> int | None:
            for attempt in range(ATTEMPTS):
                try:
                    current = await self._read()
                    value, counted_at = change(current)
                    data = json.dumps({"bytes": value, "counted_at": counted_at}).encode()
                    if current is None:
                        await client.put(self.size_key, data, if_none_match=True)
                    else:
                        await client.put(self.size_key, data, if_match=current.etag)
                except PreconditionFailed:
                    continue  # another replica wrote it meanwhile: again, on its value
                except S3Error as error:
                    if error.status < 500 or attempt == ATTEMPTS - 1:
                        raise
                    # RGW answers 500 to a request racing a write of the same key: again.
                    await deferLater(clock, RETRY_DELAY * (attempt + 1), _nothing)
                    continue
                return value
            self.log.info("object store: the total was not written (busy): recounted later")
            return None

        if self.shared.down:
            return None
        written: int | None = await self.shared.guarded("size", attempts, None)
        return written


def _nothing() -> None:
    return None


async def _retrying(clock: IReactorTime, call: Callable[[], Awaitable[T]], tries: int = 3) -> T:
    """``call()``, again after a 5xx answer (RGW answers 500 to a request racing a write of
    the same small object); the last failure is raised (then the store is failing)."""
    for attempt in range(tries - 1):
        try:
            return await call()
        except S3Error as error:
            if error.status < 500:
                raise
        await deferLater(clock, RETRY_DELAY * (attempt + 1), _nothing)
    return await call()
