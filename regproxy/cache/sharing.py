"""The caching fetcher's paths through a shared object store (``--cache-store``), beside the
local tier (``--cache-dir``) it keeps in front.

A local hit never gets here: the seam's local answers stay as fast as without a store. On a
local miss of content by digest the store is asked (``_shared_miss``):

- it holds the object (completed only by a verifier, so it is right): blobs are read into a
  local download (the local tier keeps them; every client of this replica reads along,
  ranges included, verified as always), or answered ``307`` to a presigned URL on routes
  with ``blob_redirects = "store"``; manifests are read whole, checked and stored locally;
- it does not: this replica takes the lease of the digest and fetches it from the upstream
  once for the cluster, streaming it into a multipart upload as it arrives (``s3.multipart``)
  while its own clients read along; or another replica holds the lease and this one waits
  for the final key (``s3.lease`` says why waiting, not reading from the leaseholder).

Anything the store fails at falls back to the path without it: a pull the upstream can
serve never fails because of the store.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from ..config import BlobRedirects
from ..protocol.errors import OCIError
from ..protocol.fetch import Answer, Body, BytesBody
from ..upstream.body import UpstreamBody
from .answers import BLOB_TYPE, DIGEST_HEADER
from .bodies import DownloadFeed, VerifyingBody
from .download import Download
from .manifests import MANIFEST_LIMIT
from .objects import sha256_hex
from .reading import StoredObject
from .s3.lease import HeldLease, Waited, wait
from .s3.multipart import StreamedUpload, part_size_for
from .state import Asked

if TYPE_CHECKING:
    from .s3.index import SharedIndex
    from .s3.shared import SharedStore
    from .state import Cache

IN_STORE_MEMORY = 60.0
"""Seconds a digest found in the store is redirected to without asking the store again
(objects never change; eviction spares what was served in the last 20 minutes, which covers
this, and a lifecycle rule removes them after days)."""

UNCLAIMED_LEASE = 5.0
"""Seconds a lease won for clients that then did not start its download is kept."""

HOT_WINDOW = 600.0
"""Seconds after a blob was streamed from the store within which a second whole GET of it
is read into the local tier (it is hot: later hits are served from disk)."""

REDIRECT_EXPIRY = 300
"""Seconds a presigned URL of a blob redirect is valid: enough to start a pull, short enough
that a leaked URL is soon worthless."""


class SharedPaths:
    """Mixed into ``CachingFetcher``: what it does with a shared store (``cache.shared``)."""

    cache: Cache
    log: Logger

    # Provided by CachingFetcher.
    if TYPE_CHECKING:

        async def _by_digest(
            self, asked: Asked, digest: str, *, retried: bool = False
        ) -> Answer: ...
        async def _download(self, asked: Asked, download: Download, digest: str) -> Answer: ...
        async def _admitted(self, asked: Asked, digest: str) -> bool: ...
        async def _upstream_confirms(self, asked: Asked, digest: str) -> bool: ...
        async def _join(self, asked: Asked, download: Download, digest: str) -> Answer | None: ...
        async def _bypass(self, request: Any) -> Answer: ...
        def _reading(
            self,
            asked: Asked,
            download: Download,
            digest: str,
            headers: Headers,
            size: int | None,
            on_use: Any = None,
        ) -> Answer: ...
        def _serve(
            self,
            asked: Asked,
            obj: StoredObject,
            digest: str,
            outcome: str,
            *,
            stale: bool = False,
        ) -> Answer | None: ...
        def _download_over(self, result: object, download: Download) -> object: ...
        def _committed(self, committed: bool, asked: Asked, digest: str) -> bool: ...
        def _count(self, asked: Asked, outcome: str) -> None: ...

    @property
    def _shared(self) -> SharedStore | None:
        return self.cache.shared

    def _note_served(self, digest: str) -> None:
        """``digest`` is being served (any tier, or a redirect): the store's eviction keeps
        the least recently served last."""
        usage = self.cache.usage
        if usage is not None:
            usage.served(digest)

    async def _shared_holds(self, asked: Asked, digest: str) -> bool:
        index: SharedIndex | None = self.cache.shared_index
        if index is None:
            return False
        return await index.holds(asked.route, asked.name, digest)

    async def _shared_miss(
        self, asked: Asked, digest: str, holds: bool, *, retried: bool
    ) -> Answer | None:
        """The answer through the shared store, or None: go on as without it."""
        shared = self._shared
        cache = self.cache
        if shared is None or shared.down or asked.request.method == b"HEAD":
            return None  # a HEAD the store could answer is the upstream's, as before
        held = cache.leases.get(digest)
        if held is not None and not held.released:
            # This replica won the lease a moment ago (for another of its clients): fetch.
            return await self._lease_download(asked, digest, held)
        info = await shared.find(digest)
        if info is not None:
            if not (
                await self._admitted(asked, digest)
                if holds
                else await self._upstream_confirms(asked, digest)
            ):
                return await self._bypass(asked.request)
            return await self._from_store(asked, digest, info.size)
        if retried:
            return None

        async def settle() -> Waited:
            outcome, lease = await wait(shared, digest)
            if lease is not None:
                cache.leases[digest] = lease
                # Its download starts at once, unless every client of it was refused or
                # left: then it must not be renewed for nobody.
                cache.clock.callLater(UNCLAIMED_LEASE, self._unclaimed, digest, lease)
            return outcome

        outcome = await cache.waiting.run(digest, settle)
        if outcome is Waited.GIVE_UP:
            return None
        # Stored now, or this replica holds the lease: start over, as the first of this
        # replica's clients to get here starts the download the others join.
        return await self._by_digest(asked, digest, retried=True)

    # -- this replica fetches for the cluster -------------------------------------------------

    async def _lease_download(self, asked: Asked, digest: str, lease: HeldLease) -> Answer | None:
        running = self.cache.downloads.get(digest)
        if running is not None:
            return await self._join(asked, running, digest)
        download = self.cache.downloads.start(digest)
        if download is None:
            # The local tier cannot take it: fetched without the store (others take over).
            self._drop_lease(digest, lease)
            return None
        lease.claimed = True
        self.cache.uploading[download] = lease
        download.done.addBoth(self._upload_not_started, download)
        return await self._download(asked, download, digest)

    def _upload_not_started(self, result: object, download: Download) -> object:
        lease = self.cache.uploading.pop(download, None)
        if lease is not None:  # the upstream never sent the object: free the lease now
            self._drop_lease(download.digest, lease)
        return result

    def _unclaimed(self, digest: str, lease: HeldLease) -> None:
        if not lease.claimed:
            self._drop_lease(digest, lease)

    def _drop_lease(self, digest: str, lease: HeldLease) -> None:
        if self.cache.leases.get(digest) is lease:
            del self.cache.leases[digest]
        _spawn(lease.release(), self.log, "releasing a lease")

    def _feed(self, download: Download, body: Body) -> None:
        """The upstream body into the download, and into the store when this replica holds
        the digest's lease (``uploading``)."""
        lease = self.cache.uploading.pop(download, None)
        shared = self._shared
        if lease is None or shared is None:
            body.deliver(DownloadFeed(download)).addCallbacks(
                lambda _: download.finish(), lambda failure: download.fail(failure)
            )
            return
        feed = TeeFeed(download, shared, download.digest, download.expected_size)

        def ended(result: object) -> None:
            finishing: Coroutine[Any, Any, object]
            if isinstance(result, Failure):
                download.fail(result)
                finishing = feed.upload.abort()
            else:
                download.finish()
                finishing = feed.upload.finish(download.received)
            size = download.received
            _spawn(
                self._finish_upload(finishing, download.digest, lease, size), self.log, "upload"
            )

        body.deliver(feed).addBoth(ended)

    async def _finish_upload(
        self, finishing: Coroutine[Any, Any, object], digest: str, lease: HeldLease, size: int
    ) -> None:
        try:
            stored = await finishing
        finally:
            self._drop_lease(digest, lease)
        usage, evictor = self.cache.usage, self.cache.store_evictor
        if stored is True and usage is not None:
            # The store's total grows by it; past the bound, eviction runs now.
            usage.uploaded(digest)
            total = await usage.add(size)
            if evictor is not None:
                evictor.over(total)

    # -- reading what the store holds --------------------------------------------------------

    async def _redirect(self, asked: Asked, digest: str, holds: bool) -> Answer | None:
        """A blob GET on a ``blob_redirects = "store"`` route: 307 to the store when it holds
        the object (whatever the local tier holds: the bytes do not pass through here), after
        the same access check as a hit; None: answer as without redirects."""
        shared = self._shared
        if (
            shared is None
            or asked.is_manifest
            or asked.request.method != b"GET"
            or not await self._in_store(shared, digest)
        ):
            return None
        if not (
            await self._admitted(asked, digest)
            if holds
            else await self._upstream_confirms(asked, digest)
        ):
            return await self._bypass(asked.request)
        return await self._presigned(asked, digest)

    async def _in_store(self, shared: SharedStore, digest: str) -> bool:
        known = self.cache.in_store
        seen = known.get(digest)
        now = self.cache.clock.seconds()
        if seen is not None and now - seen < IN_STORE_MEMORY:
            return True
        if await shared.find(digest) is None:
            return False
        if len(known) > 100_000:
            known.clear()
        known[digest] = now
        return True

    async def _presigned(self, asked: Asked, digest: str) -> Answer | None:
        shared = self._shared
        assert shared is not None
        try:
            url = await shared.presign(digest, REDIRECT_EXPIRY)
        except Exception:
            self.log.failure("presigning {digest}", digest=digest)
            return None
        self._count(asked, "redirect")
        self._note_served(digest)
        headers = Headers(
            {
                b"location": [url.encode()],
                DIGEST_HEADER: [digest.encode()],
                b"content-type": [b"text/plain"],
            }
        )
        return Answer(307, headers, BytesBody(b""), cache="redirect")

    async def _from_store(self, asked: Asked, digest: str, size: int) -> Answer | None:
        shared = self._shared
        assert shared is not None
        if asked.is_manifest:
            return await self._manifest_from_store(asked, digest, size)
        if asked.request.route.blob_redirects is BlobRedirects.STORE:
            return await self._presigned(asked, digest)
        running = self.cache.downloads.get(digest)
        if running is not None:
            # Another client of this replica started reading it from the store meanwhile.
            return await self._join(asked, running, digest)
        cache = self.cache
        headers = _blob_headers(digest)
        if self._first_whole_hit(asked, digest):
            # Straight from the store to the client, hashed on the way and its last chunk
            # held back until the digest matched: no local file to write and read back (on
            # a busy machine the page-cache copy of a write alone cost more than the rest
            # of the hit). A second whole GET of it soon after is read into the tier.
            # Read from the store until its body is over: never evicted by this replica
            # meanwhile, and served, for the least-recently-served order.
            open_reads = cache.store_reads
            open_reads[digest] = open_reads.get(digest, 0) + 1
            done = _once(lambda: _unread(open_reads, digest))
            streamed = await shared.open(digest)
            if streamed is None:
                done()
                return None
            self._count(asked, "hit")
            self._note_served(digest)
            body = UpstreamBody(streamed, cache.clock, cache.idle_timeout)
            return Answer(200, headers, EndingBody(VerifyingBody(body, digest), done), cache="hit")
        download = cache.downloads.start(digest, expected_size=size)
        if download is not None:
            # Shared at once (before the store answers): this replica's other clients join.
            cache.download_repository[download] = asked.repository
            cache.download_headers[download] = headers
            download.done.addBoth(self._download_over, download)
            download.done.addCallback(self._committed, asked, digest)
        # Read from the store from now until its body is over: this replica never evicts it
        # meanwhile (``s3.evict``).
        reads = cache.store_reads
        reads[digest] = reads.get(digest, 0) + 1
        over = _once(lambda: _unread(reads, digest))
        if download is not None:
            download.done.addBoth(_after, over)
        response = await shared.open(digest)
        if response is None:
            # The store failed, or the object is gone since ``find`` (evicted by another
            # replica): a failed download, whose clients start over, and this one goes on
            # as without the store (the upstream).
            if download is not None:
                download.fail(Failure(OCIError("UPSTREAM_UNAVAILABLE", "store read failed")))
            over()
            return None
        body = UpstreamBody(response, cache.clock, cache.idle_timeout)
        self._count(asked, "hit")
        self._note_served(digest)
        if download is None:
            # The local tier cannot keep it: straight from the store, verified on the way.
            direct = EndingBody(VerifyingBody(body, digest), over)
            return Answer(200, headers, direct, cache="hit")

        def flow() -> None:
            self._feed(download, body)

        reading = self._reading(asked, download, digest, headers, size, on_use=flow)
        return attrs.evolve(reading, cache="hit")

    def _first_whole_hit(self, asked: Asked, digest: str) -> bool:
        """Whether this whole-blob GET is the first of ``digest`` here for a while (then it
        is streamed past the local tier). Ranges read the whole object into the tier, so
        that each is verified before its last byte; so do hot blobs."""
        if asked.request.header(b"range") is not None:
            return False
        streamed = self.cache.streamed
        now = self.cache.clock.seconds()
        seen = streamed.get(digest)
        if seen is not None and now - seen < HOT_WINDOW:
            return False
        if len(streamed) > 100_000:
            streamed.clear()
        streamed[digest] = now
        return True

    async def _manifest_from_store(self, asked: Asked, digest: str, size: int) -> Answer | None:
        shared = self._shared
        assert shared is not None
        if size > MANIFEST_LIMIT:
            return None
        data = await shared.guarded(
            "GET", lambda: shared.client.read(shared.object_key(digest), MANIFEST_LIMIT), None
        )
        if data is None or _hex(data) != sha256_hex(digest):
            return None
        index = self.cache.shared_index
        if index is not None:
            media_type = await index.media_type_shared(digest)
            if media_type is not None:
                self.cache.media_types[digest] = media_type
        self._keep_locally(digest, data)
        return self._serve(asked, StoredObject(digest, len(data), data=data), digest, "hit")

    def _keep_locally(self, digest: str, data: bytes) -> None:
        try:
            pending = self.cache.downloads.store.begin_write(digest)
        except OSError:
            return
        if pending is None:
            return
        try:
            pending.write(data)
            pending.commit().close()
        except Exception:
            # Served all the same; the local tier only misses it (a full volume, say).
            self.log.info("could not keep {digest} in the local tier", digest=digest)
            with contextlib.suppress(Exception):
                pending.abort()


def _hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _blob_headers(digest: str) -> Headers:
    return Headers(
        {
            b"content-type": [BLOB_TYPE],
            DIGEST_HEADER: [digest.encode()],
            b"etag": [b'"' + digest.encode() + b'"'],
            b"accept-ranges": [b"bytes"],
        }
    )


def _after(result: object, action: Callable[[], None]) -> object:
    action()
    return result


def _unread(reads: dict[str, int], digest: str) -> None:
    left = reads.get(digest, 0) - 1
    if left > 0:
        reads[digest] = left
    else:
        reads.pop(digest, None)


def _once(action: Callable[[], None]) -> Callable[[], None]:
    done: list[bool] = []

    def once() -> None:
        if not done:
            done.append(True)
            action()

    return once


@attrs.define
class EndingBody:
    """A body that calls ``on_end`` once it was delivered, failed or discarded."""

    inner: Body
    on_end: Callable[[], None]

    @property
    def length(self) -> int | None:
        return self.inner.length

    def deliver(self, consumer: IConsumer) -> Deferred[int]:
        delivered = self.inner.deliver(consumer)

        def ended(result: object) -> object:
            self.on_end()
            return result

        delivered.addBoth(ended)
        return delivered

    def discard(self) -> None:
        self.inner.discard()
        self.on_end()


def _spawn(work: Any, log: Logger, what: str) -> None:
    ensureDeferred(work).addErrback(lambda f: log.failure(what, f))


class TeeFeed(DownloadFeed):
    """An upstream body into a local download and a multipart upload at once. The upstream
    is paused while either needs it (the download's readers without a local file, or parts
    in flight to the store)."""

    def __init__(
        self, download: Download, shared: SharedStore, digest: str, size: int | None
    ) -> None:
        super().__init__(download)
        self._holds: set[str] = set()
        self._push: Any = None
        self.upload = StreamedUpload(
            shared.client,
            shared.object_key(digest),
            digest,
            part_size=part_size_for(size),
            on_pressure=lambda pressed: self._hold("upload", pressed),
        )
        self.upload.begin()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        download = self.download
        download.stop_upstream = producer.stopProducing
        if isinstance(producer, IPushProducer) or hasattr(producer, "pauseProducing"):
            self._push = producer
            download.pause_upstream = lambda: self._hold("download", True)
            download.resume_upstream = lambda: self._hold("download", False)
            if download.upstream_paused:
                self._hold("download", True)

    def unregisterProducer(self) -> None:
        # The body is over: nothing to pause any more, whatever the upload still sends (the
        # upstream connection ignores it too, being back in the pool: upstream._connection).
        super().unregisterProducer()
        self._push = None

    def _hold(self, reason: str, held: bool) -> None:
        before = bool(self._holds)
        if held:
            self._holds.add(reason)
        else:
            self._holds.discard(reason)
        after = bool(self._holds)
        if self._push is not None and before != after:
            if after:
                self._push.pauseProducing()
            else:
                self._push.resumeProducing()

    def write(self, data: bytes) -> None:
        self.download.write(data)
        self.upload.write(data)
