"""The object store every replica shares: verified objects, leases, and the index's facts.

Keys under the location's prefix::

    blobs/sha256/ab/<hex>            an object, only ever completed by a verifier
    leases/sha256/<hex>              who downloads <hex> from the upstream now (JSON)
    leases/evict                     who evicts now (JSON; ``evict``)
    index/repos/<key(route, repository)>/<hex>     R is known to hold <hex> (empty)
    index/tags/<key(route, repository)>/<key(tag, accept key)>   {"digest", "confirmed_at"}
    index/media/<hex>                the Content-Type a manifest was served with
    index/served/<hex>               rewritten when <hex> is served (its Last-Modified says when)
    index/size                       the bytes under blobs/ as counted ({"bytes", "counted_at"})

Faults: a store that does not answer (refused, reset, past the request deadline), answers
5xx or refuses our credentials (401/403), or credentials that cannot be had, is *down* for
``retry_after`` seconds: every call then answers at once as if the store held nothing and
took no lease, so pulls go on from the upstream; the first failure of a streak is logged,
and the first success after it. Nothing here raises at a caller.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from ..index import TagRecord
from ..objects import sha256_hex
from .client import ObjectInfo, PreconditionFailed, S3Client, S3Error

T = TypeVar("T")


def index_key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:40]


@attrs.frozen
class LeaseState:
    """A lease object as read: its holder, expiry (the holder's clock) and ETag."""

    holder: str
    expires: float
    etag: str


class SharedStore:
    """One bucket/prefix of objects shared by every replica; ``replica`` names this one."""

    log = Logger()

    def __init__(
        self,
        client: S3Client,
        *,
        clock: IReactorTime,
        replica: str,
        lease_ttl: float = 30.0,
        retry_after: float = 5.0,
    ) -> None:
        self.client = client
        self.clock = clock
        self.replica = replica
        self.lease_ttl = lease_ttl
        self.retry_after = retry_after
        self.prefix = client.location.prefix
        self._down_until: float | None = None
        self.failures = 0

    # -- keys --------------------------------------------------------------------------------

    def object_key(self, digest: str) -> str:
        hex_ = sha256_hex(digest)
        return f"{self.prefix}blobs/sha256/{hex_[:2]}/{hex_}"

    def lease_key(self, digest: str) -> str:
        return f"{self.prefix}leases/sha256/{sha256_hex(digest)}"

    def served_key(self, digest: str) -> str:
        return f"{self.prefix}index/served/{sha256_hex(digest)}"

    def _repo_key(self, route: str, repository: str, digest: str) -> str:
        return f"{self.prefix}index/repos/{index_key(route, repository)}/{sha256_hex(digest)}"

    def _tag_key(self, route: str, repository: str, tag: str, accept: str) -> str:
        repo, name = index_key(route, repository), index_key(tag, accept)
        return f"{self.prefix}index/tags/{repo}/{name}"

    def _media_key(self, digest: str) -> str:
        return f"{self.prefix}index/media/{sha256_hex(digest)}"

    # -- faults ------------------------------------------------------------------------------

    @property
    def down(self) -> bool:
        until = self._down_until
        return until is not None and self.clock.seconds() < until

    async def guarded(self, what: str, call: Callable[[], Awaitable[T]], absent: T) -> T:
        """``call()``, or ``absent`` when the store is down or fails now (then it is down)."""
        if self.down:
            return absent
        try:
            result = await call()
        except Exception as error:
            if (
                isinstance(error, S3Error)
                and error.status < 500
                and error.status not in (401, 403)
            ):
                # An answer about this one request (400, 416...): not the store failing.
                self.log.info("object store: {what}: {error}", what=what, error=str(error))
                return absent
            # Unreachable, failing, refusing us, or no credentials (a ValueError of the
            # provider chain): left alone for a while.
            self.failures += 1
            if self._down_until is None:
                self.log.warn(
                    "object store {location} failing ({what}: {error}); serving from the"
                    " upstream until it answers again",
                    location=str(self.client.location),
                    what=what,
                    error=str(error),
                )
            self._down_until = self.clock.seconds() + self.retry_after
            return absent
        if self._down_until is not None:
            self._down_until = None
            self.log.info(
                "object store {location} answers again", location=str(self.client.location)
            )
        return result

    # -- objects -----------------------------------------------------------------------------

    async def find(self, digest: str) -> ObjectInfo | None:
        """The verified object of ``digest``, if the store holds it."""
        return await self.guarded("HEAD", lambda: self.client.head(self.object_key(digest)), None)

    async def open(
        self, digest: str, first: int | None = None, last: int | None = None
    ) -> IResponse | None:
        """The object's GET response (body unread), or None (absent, or the store failing)."""
        return await self.guarded(
            "GET", lambda: self.client.get(self.object_key(digest), first, last), None
        )

    async def presign(self, digest: str, expires: int) -> str:
        return await self.client.presign_get(self.object_key(digest), expires)

    # -- leases ------------------------------------------------------------------------------

    def _lease_body(self) -> bytes:
        expires = self.clock.seconds() + self.lease_ttl
        return json.dumps({"holder": self.replica, "expires": expires}).encode()

    async def take_lease(self, digest: str, *, over: str | None = None) -> str | None:
        """The new lease's ETag, or None: another replica holds it (or took it first).
        ``over``: take over the lease that has this ETag (its holder stopped renewing)."""
        return await self.take_lease_at(self.lease_key(digest), over=over)

    async def take_lease_at(self, key: str, *, over: str | None = None) -> str | None:
        """``take_lease`` of any lease key (``leases/evict``)."""
        body = self._lease_body()

        async def put() -> str | None:
            try:
                if over is None:
                    return await self.client.put(key, body, if_none_match=True)
                return await self.client.put(key, body, if_match=over)
            except PreconditionFailed:
                return None

        return await self.guarded("lease", put, None)

    async def renew_lease(self, digest: str, etag: str) -> str | None:
        """The renewed lease's ETag, or None: it was taken over (or the store fails)."""
        return await self.take_lease(digest, over=etag)

    async def read_lease(self, digest: str) -> LeaseState | None:
        return await self.read_lease_at(self.lease_key(digest))

    async def read_lease_at(self, key: str) -> LeaseState | None:
        async def read() -> LeaseState | None:
            response = await self.client.get(key)
            if response is None:
                return None
            etag = (response.headers.getRawHeaders(b"etag", [b""])[0]).decode().strip('"')
            data = await self.client.read_body(response)
            try:
                fields = json.loads(data)
                return LeaseState(str(fields["holder"]), float(fields["expires"]), etag)
            except (ValueError, KeyError, TypeError):
                return LeaseState("?", 0.0, etag)  # unreadable: expires like any other

        return await self.guarded("lease", read, None)

    async def release_lease(self, digest: str) -> None:
        await self.release_lease_at(self.lease_key(digest))

    async def release_lease_at(self, key: str) -> None:
        await self.guarded("lease", lambda: self.client.delete(key), None)

    # -- the index ---------------------------------------------------------------------------

    async def record_repository_digest(self, route: str, repository: str, digest: str) -> None:
        key = self._repo_key(route, repository, digest)
        await self.guarded("index", lambda: self.client.put(key, b""), "")

    async def repository_holds(self, route: str, repository: str, digest: str) -> bool:
        key = self._repo_key(route, repository, digest)

        async def head() -> bool:
            return await self.client.head(key) is not None

        return await self.guarded("index", head, False)

    async def record_tag(
        self, route: str, repository: str, tag: str, accept: str, digest: str
    ) -> None:
        record = {"digest": digest, "confirmed_at": self.clock.seconds()}
        key = self._tag_key(route, repository, tag, accept)
        data = json.dumps(record).encode()
        await self.guarded(
            "index", lambda: self.client.put(key, data, content_type="application/json"), ""
        )

    async def tag(self, route: str, repository: str, tag: str, accept: str) -> TagRecord | None:
        data = await self.guarded(
            "index",
            lambda: self.client.read(self._tag_key(route, repository, tag, accept), 4096),
            None,
        )
        if data is None:
            return None
        try:
            fields = json.loads(data)
            digest = str(fields["digest"])
            sha256_hex(digest)
            return TagRecord(digest, float(fields["confirmed_at"]))
        except (ValueError, KeyError, TypeError):
            return None

    async def record_media_type(self, digest: str, content_type: bytes) -> None:
        key = self._media_key(digest)
        await self.guarded(
            "index", lambda: self.client.put(key, content_type, content_type="text/plain"), ""
        )

    async def media_type(self, digest: str) -> bytes | None:
        return await self.guarded(
            "index", lambda: self.client.read(self._media_key(digest), 256), None
        )
