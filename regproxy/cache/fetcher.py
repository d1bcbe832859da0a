"""The pull-through cache as a decorator around any fetcher: hits from the store, misses
through the inner fetcher once for everyone asking (coalesced) and verified, tags
revalidated with a HEAD, stale tags served through upstream outages.

It implements the same :class:`~regproxy.protocol.fetch.Fetcher` interface as what it
wraps, as distribution's ``proxyBlobStore`` wraps a local and a remote store: the web layer
cannot tell a cached route from a plain one, and the cache never calls back into its
caller. Who may read what is :mod:`regproxy.cache.access`'s business.

Long-lived state (the store, the downloads in progress, what the upstream said of access)
is a :class:`Cache`; a :class:`CachingFetcher` puts it around one routing snapshot's
upstream fetcher, so a reload (SIGHUP) keeps the cache and its downloads.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from ..config import BlobRedirects, Route
from ..protocol.errors import OCIError
from ..protocol.fetch import Answer, BytesBody, Fetcher, RegistryRequest
from ..protocol.mapping import upstream_name_of
from ..protocol.reference import Kind
from .access import ANONYMOUS, accept_key, credential_key
from .answers import BLOB_TYPE, DIGEST_HEADER, reading_answer, stored_answer
from .bodies import VerifyingBody
from .download import Download, DownloadFailed, DownloadReader
from .manifests import MANIFEST_LIMIT, manifest_media_type, referenced_digests
from .objects import is_cacheable
from .sharing import SharedPaths
from .state import Asked, Cache, Revalidated, announced_headers, guarded
from .store import StoredObject

# Upstream answers that mean "the upstream is failing", for stale-if-error.
FAILING = frozenset({429, 500, 502, 503, 504})
CACHED_KINDS = frozenset({Kind.BLOB, Kind.MANIFEST})
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class CachingFetcher(SharedPaths):
    """A :class:`Fetcher` that answers blobs and manifests from a :class:`Cache` and
    everything else (and what it will not serve) through ``inner``."""

    def __init__(
        self, cache: Cache, inner: Fetcher, *, holds_credentials: Callable[[Route], bool]
    ) -> None:
        self.cache = cache
        self.inner = inner
        self.holds_credentials = holds_credentials
        self.store = cache.store
        self.index = cache.index
        self.log = cache.log

    async def fetch(self, request: RegistryRequest) -> Answer:
        kind = request.target.kind
        if kind is Kind.BASE:
            return await self._ping(request)
        if not request.route.cache or kind not in CACHED_KINDS:
            return await self.inner.fetch(request)
        name = upstream_name_of(request.target, request.route)
        assert name is not None
        asked = Asked(
            request=request,
            repository=(request.route.name, name),
            credential=None
            if self.holds_credentials(request.route)
            else credential_key(request.authorization),
        )
        reference = request.target.reference
        if is_cacheable(reference):
            return await self._by_digest(asked, reference)
        if asked.is_manifest:
            return await self._by_tag(asked)
        return await self._bypass(request)

    async def _ping(self, request: RegistryRequest) -> Answer:
        try:
            return await self.inner.fetch(request)
        except OCIError as error:
            if error.status not in (502, 504):
                raise
        # The upstream is down, and clients ping /v2/ before every pull: with a cache,
        # what it holds can still be served, so the ping says so.
        headers = Headers({b"content-type": [b"application/json"]})
        return Answer(200, headers, BytesBody(b"{}"), cache="stale")

    async def _bypass(self, request: RegistryRequest) -> Answer:
        return attrs.evolve(await self.inner.fetch(request), cache="bypass")

    # -- content by digest ------------------------------------------------------------------

    async def _by_digest(self, asked: Asked, digest: str, *, retried: bool = False) -> Answer:
        cache = self.cache
        request = asked.request
        holds = self.index.repository_holds(asked.route, asked.name, digest)
        if not holds and cache.shared_index is not None:
            holds = await self._shared_holds(asked, digest)  # what another replica learned
        if cache.shared is not None and request.route.blob_redirects is BlobRedirects.STORE:
            redirected = await self._redirect(asked, digest, holds)
            if redirected is not None:
                return redirected
        hot = cache.hot.get(digest) if holds else None
        if hot is not None:
            # Verified bytes in memory: no system call, the same access rules.
            if not await self._admitted(asked, digest):
                return await self._bypass(request)
            served = self._serve(asked, StoredObject(digest, len(hot), data=hot), digest, "hit")
            if served is not None:
                return served
        if self.store.contains(digest):
            if holds:
                admitted = await self._admitted(asked, digest)
            else:
                # Stored for another repository: R may read it only if the upstream says R
                # holds it (a HEAD, which is also this client's access check).
                admitted = holds = await self._upstream_confirms(asked, digest)
            if not admitted:
                return await self._bypass(request)
            obj = self.store.open_object(digest)
            if obj is not None:
                served = self._serve(asked, obj, digest, "hit")
                if served is not None:
                    return served
        download = cache.downloads.get(digest)
        if download is not None:
            if holds or cache.download_repository.get(download) == asked.repository:
                admitted = await self._admitted(asked, digest)
            else:
                # Downloading for another repository: R joins it once the upstream says R
                # holds the digest (a HEAD, which is also this client's access check), so a
                # layer shared by many repositories is still fetched once.
                admitted = await self._upstream_confirms(asked, digest)
            if not admitted:
                return await self._bypass(request)
            if cache.downloads.get(digest) is not download:
                # It finished (or failed) while the upstream was asked about this client:
                # start over, from what the store now holds.
                return await self._by_digest(asked, digest, retried=retried)
            joined = await self._join(asked, download, digest)
            if joined is not None:
                return joined
            # The download's own request was refused or failed: this client's is its own
            # (and, once more, its bytes verified on their way).
            if retried:
                return await self._verified_pass_through(asked, digest)
            return await self._by_digest(asked, digest, retried=True)
        if cache.shared is not None:
            answer = await self._shared_miss(asked, digest, holds, retried=retried)
            if answer is not None:
                return answer
            if cache.downloads.get(digest) is not None:
                # Started by another client while the store was asked: join it.
                return await self._by_digest(asked, digest, retried=True)
        if request.method == b"HEAD":
            return await self._bypass(request)
        try:
            download = cache.downloads.start(digest)
        except OSError:
            # The store cannot write (a full or read-only volume; counted and logged by the
            # store): the upstream serves the client, its bytes still verified on the fly.
            return await self._verified_pass_through(asked, digest)
        if download is None:
            return await self._elsewhere(asked, digest, retried=retried)
        return await self._download(asked, download, digest)

    async def _elsewhere(self, asked: Asked, digest: str, *, retried: bool) -> Answer:
        """Another process on this directory downloads ``digest`` (read along its file), or
        it is not this process's to store (too large, being evicted): verified pass-through."""
        remote = self.cache.remote.find(digest) if self.cache.remote is not None else None
        if remote is None:
            return await self._verified_pass_through(asked, digest)
        if self.index.repository_holds(asked.route, asked.name, digest):
            admitted = await self._admitted(asked, digest)
        else:
            admitted = await self._upstream_confirms(asked, digest)
        if not admitted:
            return await self._bypass(asked.request)
        try:
            announced = await guarded(remote.when_announced(), lambda: None)
        except DownloadFailed:
            # Its writer stopped before the upstream answered: this request is its own.
            if retried:
                return await self._verified_pass_through(asked, digest)
            return await self._by_digest(asked, digest, retried=True)
        if not remote.joinable:
            # It ended while this client was admitted (another process renamed it into
            # place, or gave up): reading along is over, so start again from the store.
            if retried:
                return await self._verified_pass_through(asked, digest)
            return await self._by_digest(asked, digest, retried=True)
        headers = Headers()
        for name, value in announced.headers:
            headers.addRawHeader(name, value)
        self._count(asked, "coalesced")

        def attach(consumer: IConsumer, first: int, last: int | None) -> DownloadReader:
            return remote.attach(
                consumer, first, last, refetch=lambda download: self._refetch(asked, download)
            )

        return reading_answer(
            attach, digest, headers, announced.size, asked.request.header(b"range")
        )

    def _refetch(self, asked: Asked, download: Download) -> None:
        """This process takes over a download whose writer died: fetch it for the readers."""

        async def fetch() -> None:
            answer = await self.inner.fetch(self._whole(asked, "GET", download.digest))
            body = answer.body
            if answer.status != 200 or body is None:
                if body is not None:
                    body.discard()
                download.fail(Failure(OCIError("UPSTREAM_UNAVAILABLE", "no content upstream")))
                return
            download.announce(body.length, announced_headers(answer))
            self._feed(download, body)

        ensureDeferred(fetch()).addErrback(download.fail)

    async def _verified_pass_through(self, asked: Asked, digest: str) -> Answer:
        request = asked.request
        if request.target.reference != digest:
            request = attrs.evolve(
                request,
                target=attrs.evolve(request.target, reference=digest),
                client_target=attrs.evolve(request.client_target, reference=digest),
            )
        answer = await self.inner.fetch(request)
        self._learn(asked, answer.status)
        if answer.status != 200 or answer.body is None:
            # Only a whole object can be checked against its digest (not a 206 part).
            return attrs.evolve(answer, cache="bypass")
        return attrs.evolve(answer, body=VerifyingBody(answer.body, digest), cache="bypass")

    async def _download(self, asked: Asked, download: Download, digest: str) -> Answer:
        cache = self.cache
        cache.download_repository[download] = asked.repository
        download.done.addBoth(self._download_over, download)
        try:
            answer = await self.inner.fetch(self._whole(asked, "GET", digest))
        except BaseException as error:
            download.fail(Failure(error))
            raise
        self._learn(asked, answer.status)
        body = answer.body
        if answer.status == 200 and asked.credential is not None:
            # The upstream just served R to this credential: that is its access check.
            self.cache.access.admit(asked.repository, asked.credential)
        if answer.status != 200 or body is None:
            # Not an object for the cache: joiners send their own requests; this client
            # gets the upstream's answer.
            download.fail(Failure(OCIError("UPSTREAM_UNAVAILABLE", "no content upstream")))
            return answer
        # Only read from here on: joiners' answers are built from them.
        headers = answer.headers
        if asked.is_manifest:
            content_type = answer.header(b"content-type")
            if content_type is not None and _TOKEN.match(content_type):
                self._remember_media_type(digest, content_type)
                self.index.record_media_type(digest, content_type)
        # Before announcing: readers that joined while the upstream had not answered yet
        # resume on the announcement and take these headers (Content-Type above all).
        cache.download_headers[download] = headers
        download.announce(body.length, announced_headers(answer))
        download.done.addCallback(self._committed, asked, digest)
        self._count(asked, "miss")

        def flow() -> None:
            self._feed(download, body)

        reading = self._reading(asked, download, digest, headers, body.length, on_use=flow)
        return attrs.evolve(
            reading,
            upstream_status=answer.upstream_status,
            upstream_seconds=answer.upstream_seconds,
            cache="miss",
        )

    async def _join(self, asked: Asked, download: Download, digest: str) -> Answer | None:
        """A client joining a download another request of this process started, once the
        upstream answered that request with the object (None: it did not)."""
        try:
            size = await guarded(download.when_announced(), lambda: None)
        except Exception:
            return None
        # Read only now: the headers of the upstream's answer, which may have arrived
        # after this client joined.
        headers = self.cache.download_headers.get(download)
        if headers is None or download.failed:
            return None
        self._count(asked, "coalesced")
        return self._reading(asked, download, digest, headers, size)

    def _reading(
        self,
        asked: Asked,
        download: Download,
        digest: str,
        headers: Headers,
        size: int | None,
        on_use: Callable[[], None] | None = None,
    ) -> Answer:
        return reading_answer(
            download.attach, digest, headers, size, asked.request.header(b"range"), on_use=on_use
        )

    def _download_over(self, result: object, download: Download) -> object:
        self.cache.download_headers.pop(download, None)
        self.cache.download_repository.pop(download, None)
        return result

    def _committed(self, committed: bool, asked: Asked, digest: str) -> bool:
        if committed:
            self.index.record_repository_digest(asked.route, asked.name, digest)
            if asked.is_manifest:
                self._record_children(asked, digest)
        return committed

    def _record_children(self, asked: Asked, digest: str) -> None:
        obj = self.store.open_object(digest)
        if obj is None:
            return
        with obj:
            data = obj.read_verified(MANIFEST_LIMIT)
        if data is not None:
            self._children_known(asked, digest, data)

    def _children_known(self, asked: Asked, digest: str, data: bytes) -> None:
        """A manifest of R lists what R holds: record it once."""
        recorded = self.cache.children_recorded
        key = (asked.route, asked.name, digest)
        if key in recorded:
            return
        if len(recorded) > 100_000:
            recorded.clear()
        recorded.add(key)
        for child in referenced_digests(data):
            self.index.record_repository_digest(asked.route, asked.name, child)

    def _remember_media_type(self, digest: str, media_type: bytes) -> None:
        media_types = self.cache.media_types
        if len(media_types) > 10_000:
            media_types.clear()
        media_types[digest] = media_type

    # -- hits -------------------------------------------------------------------------------

    def _serve(
        self, asked: Asked, obj: StoredObject, digest: str, outcome: str, *, stale: bool = False
    ) -> Answer | None:
        """``obj`` as the answer (None: a manifest that cannot be served from the store)."""
        if asked.is_manifest:
            media_type = self.cache.media_types.get(digest)
            if media_type is None:
                # The upstream's Content-Type, as recorded with the object.
                media_type = self.index.media_type(digest)
                if media_type is not None:
                    self._remember_media_type(digest, media_type)
            key = (asked.route, asked.name, digest)
            if media_type is None or key not in self.cache.children_recorded:
                data = obj.read_verified(MANIFEST_LIMIT)
                if data is None:
                    # Larger than any manifest may be, or corrupt (then removed): the
                    # upstream answers instead.
                    obj.close()
                    return None
                if media_type is None:
                    # Stored before media types were recorded: read off the bytes.
                    media_type = manifest_media_type(data)
                    self._remember_media_type(digest, media_type)
                self._children_known(asked, digest, data)
        else:
            media_type = BLOB_TYPE
        if obj.data is not None:
            self.cache.hot.put(digest, obj.data)
        self._count(asked, outcome)
        self._note_served(digest)
        return stored_answer(
            obj,
            digest,
            media_type,
            asked.request,
            metrics=self.store.metrics,
            outcome=outcome,
            stale=stale,
            clock=self.cache.clock,
            prebuilt=self.cache.answer_headers,
        )

    # -- access -----------------------------------------------------------------------------

    def _whole(self, asked: Asked, method: str, digest: str | None = None) -> RegistryRequest:
        """The request the cache sends upstream for ``asked``: the whole object (or a HEAD),
        by ``digest`` when given, with the client's credentials as the route sends them."""
        request = asked.request
        target, client_target = request.target, request.client_target
        if digest is not None and target.reference != digest:
            target = attrs.evolve(target, reference=digest)
            client_target = attrs.evolve(client_target, reference=digest)
        return attrs.evolve(
            request,
            method=method.encode(),
            target=target,
            client_target=client_target,
            whole_object=True,
        )

    async def _head(self, asked: Asked, digest: str | None = None) -> int | None:
        """The status of a HEAD upstream for ``asked`` (None: the upstream failed)."""
        try:
            answer = await self.inner.fetch(self._whole(asked, "HEAD", digest))
        except OCIError:
            return None
        if answer.body is not None:
            answer.body.discard()
        self._learn(asked, answer.status)
        return answer.status

    async def _upstream_confirms(self, asked: Asked, digest: str) -> bool:
        """Whether the upstream says R holds ``digest`` (to this client): one HEAD for
        everyone with the same credential asking the same at the same moment."""

        async def confirm() -> bool:
            if await self._head(asked, digest) != 200:
                return False
            self.index.record_repository_digest(asked.route, asked.name, digest)
            if asked.credential is not None:
                self.cache.access.admit(asked.repository, asked.credential)
            return True

        key = (*asked.repository, asked.credential or "", digest)
        return await self.cache.confirming.run(key, confirm)

    async def _admitted(self, asked: Asked, digest: str) -> bool:
        """Whether this client may read R: always with the route's own credentials;
        otherwise once the upstream accepted the client's credential for R."""
        credential = asked.credential
        if credential is None:
            return True

        async def ask() -> bool:
            if await self._head(asked, digest) != 200:
                return False
            self.cache.access.admit(asked.repository, credential)
            return True

        return await self.cache.access.check(asked.repository, credential, ask)

    def _learn(self, asked: Asked, status: int) -> None:
        if asked.credential is not None:
            self.cache.access.learn(asked.repository, asked.credential, status)

    # -- tags -------------------------------------------------------------------------------

    async def _by_tag(self, asked: Asked) -> Answer:
        cache = self.cache
        request = asked.request
        tag = request.target.reference
        accepts = accept_key(request.headers.getRawHeaders(b"accept", []))
        record = self.index.tag(asked.route, asked.name, tag, accepts)
        if record is None and cache.shared_index is not None:
            record = await cache.shared_index.tag_shared(asked.route, asked.name, tag, accepts)
        now = cache.clock.seconds()
        if (
            record is not None
            and cache.tag_ttl > 0
            and now - record.confirmed_at < cache.tag_ttl
            and self.store.contains(record.digest)
            and request.method == b"GET"
        ):
            return await self._by_digest(asked, record.digest)
        try:
            revalidated = await self._revalidate(asked, accepts)
        except OCIError as error:
            if error.status in (502, 504):
                stale = self._stale(asked, record)
                if stale is not None:
                    return stale
            raise
        if revalidated.status in FAILING:
            stale = self._stale(asked, record)
            if stale is not None:
                return stale
        self._learn(asked, revalidated.status)
        if revalidated.status != 200 or revalidated.digest is None:
            return await self._bypass(request)
        digest = revalidated.digest
        self.index.record_tag(asked.route, asked.name, tag, accepts, digest)
        self.index.record_repository_digest(asked.route, asked.name, digest)
        if request.method == b"HEAD" and not self.store.contains(digest):
            return await self._bypass(request)
        return await self._by_digest(asked, digest)

    async def _revalidate(self, asked: Asked, accepts: str) -> Revalidated:
        """One manifest HEAD upstream for everyone asking for this tag with the same
        credential right now (never another credential's answer)."""
        key = (
            asked.route,
            asked.name,
            asked.request.target.reference,
            accepts,
            asked.credential or "",
        )

        async def head() -> Revalidated:
            answer = await self.inner.fetch(self._whole(asked, "HEAD"))
            if answer.body is not None:
                answer.body.discard()
            text = (answer.header(DIGEST_HEADER) or b"").decode("latin-1").strip()
            return Revalidated(answer.status, text if is_cacheable(text) else None)

        return await self.cache.revalidating.run(key, head)

    def _stale(self, asked: Asked, record: Any) -> Answer | None:
        """The last known digest of the tag, if recent enough and still stored."""
        cache = self.cache
        if record is None or cache.clock.seconds() - record.confirmed_at > cache.stale_max_age:
            return None
        credential = asked.credential
        if credential is not None and not (
            cache.access.is_public(asked.repository, credential)
            or cache.access.remembered(asked.repository, credential)
        ):
            return None  # the upstream cannot confirm this client now: no cached answer
        obj = self.store.open_object(record.digest)
        if obj is None:
            return None
        self.log.warn(
            "route {route}: upstream failing, serving {repository}:{tag} from the cache"
            " (confirmed {age:.0f} s ago)",
            route=asked.route,
            repository=asked.name,
            tag=asked.request.target.reference,
            age=cache.clock.seconds() - record.confirmed_at,
        )
        return self._serve(asked, obj, record.digest, "stale", stale=True)

    # -- bookkeeping ------------------------------------------------------------------------

    def _count(self, asked: Asked, outcome: str) -> None:
        self.cache.counts.cache_outcome(asked.route, outcome)


__all__ = ["ANONYMOUS", "Cache", "CachingFetcher", "accept_key", "credential_key"]
