"""The pull-through cache in the request path: hits from disk, misses coalesced and verified,
tags revalidated with a HEAD (once for all who ask at the same moment), stale tags served
through upstream outages.

The forwarder hands each blob or manifest request here first (:meth:`CachingFetcher.handle`)
with an :class:`UpstreamOps` for talking to the upstream the way it would itself (the route's
credentials or the client's, redirects followed without credentials, headers rewritten for
the client). The answer is :data:`HANDLED` (the client has its answer), :data:`PASS` (the
forwarder goes on as without a cache), or an upstream response for the forwarder to relay.

Access: a cache must not become a way around the upstream's authorization.

* Content is served from disk for repository R only when R is known to hold it (a manifest of
  R listed it, or the upstream served it for R): no repository reads another's by guessing.
* With clients' own credentials passed through, a hit for R is served only to a client the
  upstream accepted for R: a HEAD with the client's credential, remembered for
  ``ACCESS_MEMORY`` seconds per (hash of the credential, R).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request

from ..protocol.bodies import Discard
from ..protocol.errors import OCIError
from ..relay import abort_client
from ..upstream.singleflight import SingleFlight
from .download import (
    Download,
    DownloadProtocol,
    DownloadReader,
    Downloads,
    ReaderStopped,
    wait_for_commit,
)
from .objects import is_cacheable
from .serve import ByteRange, Unsatisfiable, choose_range, parse_range, serve_object
from .store import CacheStore, DigestMismatch, StoredObject

ACCESS_MEMORY = 60.0
# How long a request waits for another process's download of the same object to commit
# before it fetches the object itself (unverified, passed through).
CROSS_PROCESS_WAIT = 30.0
STALE_WARNING = b'110 - "Response is Stale"'
BLOB_TYPE = b"application/octet-stream"
MANIFEST_LIMIT = 4 * 1024 * 1024
# Upstream answers that mean "the upstream is failing", for stale-if-error.
FAILING = frozenset({429, 500, 502, 503, 504})


class Outcome:
    """What became of a request the cache was offered."""


HANDLED = Outcome()
PASS = Outcome()


@attrs.frozen
class Relay(Outcome):
    """An upstream answer the cache will not serve itself: the forwarder relays it."""

    response: IResponse
    url: str


class UpstreamOps(Protocol):
    """How the cache talks upstream for one request, as the forwarder would."""

    async def send(self, method: str, url: str) -> IResponse:
        """Send with the request's credentials (and no Range); redirects followed."""

    def copy_headers(self, response: IResponse) -> None:
        """Copy the upstream answer's headers, rewritten for the client."""


class RouteCounts(Protocol):
    def cache_outcome(self, route: str, outcome: str) -> None: ...


@attrs.frozen
class CacheRequest:
    request: Request
    route: str
    repository: str  # the upstream's name
    is_manifest: bool
    reference: str  # a digest, or a tag (manifests only)
    url: str  # the upstream URL of this request
    digest_url: Callable[[str], str]  # the upstream URL of a manifest of R by digest
    accept_key: str
    # Hash of the client's own Authorization when clients' credentials are passed through
    # (""" for none); None when the route holds credentials (or needs none): then the
    # route's admission is the access check.
    credential: str | None


def credential_key(authorization: bytes | None) -> str:
    return hashlib.sha256(authorization or b"").hexdigest()


ANONYMOUS = credential_key(None)


def accept_key(accepts: Sequence[bytes]) -> str:
    """Which manifest a tag resolves to depends on Accept: one record per set of types."""
    types = sorted(
        {part.split(b";")[0].strip().lower() for v in accepts for part in v.split(b",")}
    )
    return hashlib.sha256(b",".join(types)).hexdigest()[:16]


def manifest_media_type(data: bytes) -> bytes:
    """The Content-Type of manifest bytes from disk: their ``mediaType``, else by shape."""
    try:
        document = json.loads(data)
    except ValueError:
        return b"application/json"
    if not isinstance(document, dict):
        return b"application/json"
    media_type = document.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type.encode()
    if document.get("schemaVersion") == 1:
        return b"application/vnd.docker.distribution.manifest.v1+prettyjws"
    if "manifests" in document:
        return b"application/vnd.oci.image.index.v1+json"
    return b"application/vnd.oci.image.manifest.v1+json"


def referenced_digests(data: bytes) -> list[str]:
    """What a manifest or index names: its config, layers, child manifests, subject."""
    try:
        document = json.loads(data)
    except ValueError:
        return []
    if not isinstance(document, dict):
        return []
    found: list[str] = []
    for key in ("config", "subject"):
        item = document.get(key)
        if isinstance(item, dict) and isinstance(item.get("digest"), str):
            found.append(item["digest"])
    for key in ("layers", "manifests", "blobs"):
        for item in document.get(key) or ():
            if isinstance(item, dict) and isinstance(item.get("digest"), str):
                found.append(item["digest"])
    for item in document.get("fsLayers") or ():  # schema 1
        if isinstance(item, dict) and isinstance(item.get("blobSum"), str):
            found.append(item["blobSum"])
    return [digest for digest in found if is_cacheable(digest)]


@attrs.frozen
class _Revalidated:
    status: int
    digest: str | None


class CachingFetcher:
    log = Logger()

    def __init__(
        self,
        store: CacheStore,
        downloads: Downloads,
        *,
        clock: IReactorTime,
        tag_ttl: float = 0.0,
        stale_max_age: float = 7 * 86400.0,
        idle_timeout: float = 60.0,
        cross_process_wait: float = CROSS_PROCESS_WAIT,
        counts: RouteCounts | None = None,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.cross_process_wait = cross_process_wait
        self.store = store
        self.index = store.index
        self.downloads = downloads
        self.clock = clock
        self.tag_ttl = tag_ttl
        self.stale_max_age = stale_max_age
        self.counts = counts
        self._access: dict[tuple[str, str, str], float] = {}
        self._revalidating: SingleFlight[tuple[str, ...], _Revalidated] = SingleFlight()
        # Per digest in download: the answer headers its first reader got, for the others.
        self._headers: dict[str, list[tuple[bytes, list[bytes]]]] = {}
        self._download_repo: dict[str, tuple[str, str]] = {}
        self._children_recorded: set[tuple[str, str, str]] = set()
        # Manifest digest -> its Content-Type (from its bytes, which never change).
        self._media_types: dict[str, bytes] = {}
        # (route, repository) the upstream served without credentials.
        self._open: set[tuple[str, str]] = set()

    # -- entry point ------------------------------------------------------------------------

    async def handle(self, asked: CacheRequest, ops: UpstreamOps, exchange: Any) -> Outcome:
        if asked.is_manifest and not is_cacheable(asked.reference):
            return await self._by_tag(asked, ops, exchange)
        if not is_cacheable(asked.reference):
            exchange.cache = "bypass"
            return PASS
        return await self._by_digest(asked, ops, exchange, asked.reference, asked.url)

    # -- content by digest ------------------------------------------------------------------

    async def _by_digest(
        self, asked: CacheRequest, ops: UpstreamOps, exchange: Any, digest: str, url: str
    ) -> Outcome:
        holds = self.index.repository_holds(asked.route, asked.repository, digest)
        if self.store.contains(digest):
            if holds:
                admitted = await self._admitted(asked, ops)
            else:
                # Stored for another repository: R may read it only if the upstream says R
                # holds it (a HEAD, which is also this client's access check).
                admitted = holds = await self._upstream_confirms(asked, ops, url, digest)
            if not admitted:
                exchange.cache = "bypass"
                return PASS
            obj = self.store.open_object(digest)
            if obj is not None:
                self._count(asked, exchange, "hit")
                await self._serve(asked, obj, digest)
                return HANDLED
        download = self.downloads.get(digest)
        if download is not None:
            if not (holds or self._download_repo.get(digest) == (asked.route, asked.repository)):
                exchange.cache = "bypass"
                return PASS
            if not await self._admitted(asked, ops):
                exchange.cache = "bypass"
                return PASS
            if self.downloads.get(digest) is not download:
                # It finished (or failed) while the upstream was asked about this client:
                # start over, from what the store now holds.
                return await self._by_digest(asked, ops, exchange, digest, url)
            self._count(asked, exchange, "coalesced")
            await self._read_download(asked, exchange, download, digest)
            return HANDLED
        if asked.request.method == b"HEAD":
            exchange.cache = "bypass"
            return PASS
        download = self.downloads.start(digest)
        if download is None:
            if self.store.writer_active(digest):
                # Another process on this directory downloads it: wait for its commit (the
                # file lock says when) rather than fetch it a second time.
                committed = await _guarded(
                    wait_for_commit(
                        self.store, digest, self.clock, timeout=self.cross_process_wait
                    ),
                    lambda: None,
                )
                if committed is not None:
                    if self.index.repository_holds(asked.route, asked.repository, digest):
                        admitted = await self._admitted(asked, ops)
                    else:
                        admitted = await self._upstream_confirms(asked, ops, url, digest)
                    if admitted:
                        self._count(asked, exchange, "coalesced")
                        await self._serve(asked, committed, digest)
                        return HANDLED
                    committed.close()
            # Too large for the cache, or the other process took too long: pass through.
            exchange.cache = "bypass"
            return PASS
        self._download_repo[digest] = (asked.route, asked.repository)
        download.done.addBoth(self._download_over, digest)
        try:
            response = await ops.send("GET", url)
        except BaseException as error:
            download.fail(Failure(error))
            raise
        self._learn_public(asked, response.code)
        if response.code != 200:
            download.fail(Failure(OCIError("UPSTREAM_UNAVAILABLE", "no content upstream")))
            return Relay(response, url)
        self._count(asked, exchange, "miss")
        length = None if response.length is UNKNOWN_LENGTH else int(response.length)
        ops.copy_headers(response)
        request = asked.request
        # Before announcing: readers that joined while the upstream had not answered yet
        # resume on the announcement and take these headers (Content-Type above all).
        self._headers[digest] = list(request.responseHeaders.getAllRawHeaders())  # type: ignore[arg-type]
        download.announce(length)
        download.done.addCallback(self._committed, asked, digest)
        # This client reads before the body flows: a body that arrived with the headers is
        # delivered at once, and the download must not be over before anyone reads it.
        reader = self._attach(asked, download, digest, None, length)
        response.deliverBody(DownloadProtocol(download))
        if reader is None:
            return HANDLED
        self._watch(download, download.received)
        await self._finish_reading(asked, exchange, reader, digest)
        return HANDLED

    def _watch(self, download: Download, received: int) -> None:
        """Abandon a download whose upstream body sends nothing for the idle timeout."""

        def check() -> None:
            if download.done.called or download.failed:
                return
            if download.received == received:
                if download.stop_upstream is not None:
                    download.stop_upstream()
                download.fail(Failure(OCIError("UPSTREAM_TIMEOUT", "the upstream body stalled")))
                return
            self._watch(download, download.received)

        self.clock.callLater(self.idle_timeout, check)

    def _download_over(self, result: object, digest: str) -> object:
        self._headers.pop(digest, None)
        self._download_repo.pop(digest, None)
        return result

    def _committed(self, committed: bool, asked: CacheRequest, digest: str) -> bool:
        if committed:
            self.index.record_repository_digest(asked.route, asked.repository, digest)
            if asked.is_manifest:
                self._record_children(asked, digest)
        return committed

    def _children_known(self, asked: CacheRequest, digest: str, data: bytes) -> None:
        """A manifest of R served from the cache lists what R holds: record it once."""
        key = (asked.route, asked.repository, digest)
        if key in self._children_recorded:
            return
        if len(self._children_recorded) > 100_000:
            self._children_recorded.clear()
        self._children_recorded.add(key)
        for child in referenced_digests(data):
            self.index.record_repository_digest(asked.route, asked.repository, child)

    def _record_children(self, asked: CacheRequest, digest: str) -> None:
        obj = self.store.open_object(digest)
        if obj is None:
            return
        with obj:
            if obj.size > MANIFEST_LIMIT:
                return
            data = obj.data if obj.data is not None else obj.read(0, obj.size)
        for child in referenced_digests(data):
            self.index.record_repository_digest(asked.route, asked.repository, child)

    async def _read_download(
        self,
        asked: CacheRequest,
        exchange: Any,
        download: Download,
        digest: str,
    ) -> None:
        """A client joining a download another request of this process started."""
        size = await _guarded(download.when_announced(), lambda: None)
        # Read only now: the headers are those of the upstream's answer, which may have
        # arrived after this client joined.
        headers = self._headers.get(digest, [])
        reader = self._attach(asked, download, digest, headers, size)
        if reader is not None:
            await self._finish_reading(asked, exchange, reader, digest)

    def _attach(
        self,
        asked: CacheRequest,
        download: Download,
        digest: str,
        headers: list[tuple[bytes, list[bytes]]] | None,
        size: int | None,
    ) -> DownloadReader | None:
        """Answer the headers and attach this client as a reader (None: a 416 was answered)."""
        request = asked.request
        if headers is not None:
            for name, values in headers:
                if name.lower() not in (b"content-length", b"content-range"):
                    request.responseHeaders.setRawHeaders(name, values)
        request.setResponseCode(200)
        first, last = 0, None
        if size is not None:
            chosen = parse_range(request.getHeader(b"range"), size)
            if isinstance(chosen, Unsatisfiable):
                request.setResponseCode(416)
                request.setHeader(b"content-range", b"bytes */%d" % size)
                request.setHeader(b"content-length", b"0")
                request.finish()
                return None
            if isinstance(chosen, ByteRange):
                first, last = chosen.first, chosen.last
                request.setResponseCode(206)
                request.setHeader(b"content-range", b"bytes %d-%d/%d" % (first, last, size))
            end = size if last is None else last + 1
            request.setHeader(b"content-length", b"%d" % (end - first))
        request.setHeader(b"docker-content-digest", digest.encode())
        return download.attach(request, first, last)

    async def _finish_reading(
        self, asked: CacheRequest, exchange: Any, reader: DownloadReader, digest: str
    ) -> None:
        request = asked.request
        try:
            await _guarded(reader.done, reader.stopProducing)
        except ReaderStopped:
            exchange.error_kind = exchange.error_kind or "client_gone"
            return
        except Exception as error:
            # A wrong digest or an upstream that broke off: the client must never take what
            # it got for a whole body, so the connection is cut before the last byte.
            if isinstance(error, DigestMismatch):
                exchange.error_kind = "digest_mismatch"
                self.log.error(
                    "route {route}: {digest} from the upstream does not match its digest;"
                    " not kept, every reader cut off",
                    route=asked.route,
                    digest=digest,
                )
            else:
                exchange.error_kind = exchange.error_kind or "body"
            abort_client(request)
            return
        request.finish()

    async def _serve(
        self, asked: CacheRequest, obj: StoredObject, digest: str, *, stale: bool = False
    ) -> None:
        request = asked.request
        if asked.is_manifest:
            media_type = self._media_types.get(digest)
            if media_type is None or (asked.route, asked.repository, digest) not in (
                self._children_recorded
            ):
                data = obj.data if obj.data is not None else obj.read(0, min(obj.size, 1 << 20))
                media_type = manifest_media_type(data)
                if len(self._media_types) > 10_000:
                    self._media_types.clear()
                self._media_types[digest] = media_type
                self._children_known(asked, digest, data)
            request.setHeader(b"content-type", media_type)
        else:
            request.setHeader(b"content-type", BLOB_TYPE)
        request.setHeader(b"docker-content-digest", digest.encode())
        etag = b'"' + digest.encode() + b'"'
        request.setHeader(b"etag", etag)
        if stale:
            request.setHeader(b"warning", STALE_WARNING)
        serving = serve_object(request, obj, byte_range=choose_range(request, obj.size, etag))
        with contextlib.suppress(Exception):  # the client left: the connection was dropped
            await _guarded(serving, lambda: None)

    # -- access -----------------------------------------------------------------------------

    async def _upstream_confirms(
        self, asked: CacheRequest, ops: UpstreamOps, url: str, digest: str
    ) -> bool:
        try:
            response = await ops.send("HEAD", url)
        except OCIError:
            return False
        response.deliverBody(Discard())
        self._learn_public(asked, response.code)
        if response.code != 200:
            return False
        self.index.record_repository_digest(asked.route, asked.repository, digest)
        if asked.credential is not None:
            key = (asked.route, asked.repository, asked.credential)
            self._access[key] = self.clock.seconds() + ACCESS_MEMORY
        return True

    async def _admitted(self, asked: CacheRequest, ops: UpstreamOps) -> bool:
        """Whether this client may read R: always with the route's own credentials;
        otherwise once the upstream accepted the client's credential for R."""
        if asked.credential is None or self._public(asked):
            return True
        key = (asked.route, asked.repository, asked.credential)
        now = self.clock.seconds()
        if self._access.get(key, 0.0) > now:
            return True
        try:
            response = await ops.send("HEAD", asked.url)
        except OCIError:
            return False
        response.deliverBody(Discard())
        self._learn_public(asked, response.code)
        if response.code != 200:
            return False
        if len(self._access) > 10_000:
            self._access = {k: t for k, t in self._access.items() if t > now}
        self._access[key] = now + ACCESS_MEMORY
        return True

    # -- tags -------------------------------------------------------------------------------

    async def _by_tag(self, asked: CacheRequest, ops: UpstreamOps, exchange: Any) -> Outcome:
        tag = asked.reference
        record = self.index.tag(asked.route, asked.repository, tag, asked.accept_key)
        now = self.clock.seconds()
        if (
            record is not None
            and self.tag_ttl > 0
            and now - record.confirmed_at < self.tag_ttl
            and self.store.contains(record.digest)
            and asked.request.method == b"GET"
        ):
            return await self._by_digest(
                asked, ops, exchange, record.digest, asked.digest_url(record.digest)
            )
        try:
            revalidated = await self._revalidate(asked, ops)
        except OCIError as error:
            if error.status in (502, 504) and await self._stale(asked, exchange, record):
                return HANDLED
            raise
        if revalidated.status in FAILING and await self._stale(asked, exchange, record):
            return HANDLED
        self._learn_public(asked, revalidated.status)
        if revalidated.status != 200 or revalidated.digest is None:
            exchange.cache = "bypass"
            return PASS
        digest = revalidated.digest
        self.index.record_tag(asked.route, asked.repository, tag, asked.accept_key, digest)
        self.index.record_repository_digest(asked.route, asked.repository, digest)
        if asked.request.method == b"HEAD" and not self.store.contains(digest):
            exchange.cache = "bypass"
            return PASS
        return await self._by_digest(asked, ops, exchange, digest, asked.digest_url(digest))

    async def _revalidate(self, asked: CacheRequest, ops: UpstreamOps) -> _Revalidated:
        """One manifest HEAD upstream for everyone asking for this tag right now."""
        key = (
            asked.route,
            asked.repository,
            asked.reference,
            asked.accept_key,
            asked.credential or "",
        )
        return await self._revalidating.run(key, lambda: self._head(asked, ops))

    async def _head(self, asked: CacheRequest, ops: UpstreamOps) -> _Revalidated:
        response = await ops.send("HEAD", asked.url)
        response.deliverBody(Discard())
        digest = (response.headers.getRawHeaders(b"docker-content-digest") or [b""])[0]
        text = digest.decode("latin-1").strip()
        return _Revalidated(response.code, text if is_cacheable(text) else None)

    async def _stale(self, asked: CacheRequest, exchange: Any, record: Any) -> bool:
        """Serve the last known digest of the tag, if recent enough and still on disk."""
        if record is None or self.clock.seconds() - record.confirmed_at > self.stale_max_age:
            return False
        if asked.credential is not None and not (self._public(asked) or self._remembered(asked)):
            return False  # the upstream cannot confirm this client now: no cached answer
        obj = self.store.open_object(record.digest)
        if obj is None:
            return False
        self._count(asked, exchange, "stale")
        self.log.warn(
            "route {route}: upstream failing, serving {repository}:{tag} from the cache"
            " (confirmed {age:.0f} s ago)",
            route=asked.route,
            repository=asked.repository,
            tag=asked.reference,
            age=self.clock.seconds() - record.confirmed_at,
        )
        await self._serve(asked, obj, record.digest, stale=True)
        return True

    def _public(self, asked: CacheRequest) -> bool:
        """Whether R is known to be readable without credentials, and this client has none.

        Learnt from the upstream itself (it answered an anonymous request for R) and
        forgotten when it refuses one: unlike one client's credential, this does not
        expire, so anonymous pulls of public repositories keep working through outages.
        """
        return asked.credential == ANONYMOUS and (asked.route, asked.repository) in self._open

    def _learn_public(self, asked: CacheRequest, status: int) -> None:
        if asked.credential != ANONYMOUS:
            return
        if status == 200:
            self._open.add((asked.route, asked.repository))
        elif status in (401, 403):
            self._open.discard((asked.route, asked.repository))

    def _remembered(self, asked: CacheRequest) -> bool:
        key = (asked.route, asked.repository, asked.credential or "")
        return self._access.get(key, 0.0) > self.clock.seconds()

    def _count(self, asked: CacheRequest, exchange: Any, outcome: str) -> None:
        exchange.cache = outcome
        if self.counts is not None:
            self.counts.cache_outcome(asked.route, outcome)


def _guarded(source: Deferred[Any], on_cancel: Callable[[], None]) -> Deferred[Any]:
    """A Deferred following ``source`` that may be cancelled (the client left) without
    cancelling ``source``, which others share or which fires later on its own schedule:
    cancelling runs ``on_cancel`` instead."""
    waiter: Deferred[Any] = Deferred(lambda _: on_cancel())

    def forward(result: object) -> None:
        if not waiter.called:
            waiter.callback(result) if not isinstance(result, Failure) else waiter.errback(result)

    source.addBoth(forward)
    return waiter
