"""The cache's long-lived state (:class:`Cache`: the store, the downloads in progress, what
the upstream said of access, small objects in memory) and the values the caching fetcher
passes around. One ``Cache`` serves the fetchers of every routing snapshot, so a reload
(SIGHUP) keeps the cache and its downloads."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from ..protocol.fetch import Answer, RegistryRequest
from ..protocol.reference import Kind
from ..upstream.singleflight import SingleFlight
from .access import AccessMemory, Repository
from .download import Download, Downloads
from .hot import HotObjects
from .storage import ObjectStore
from .tail import RemoteDownloads

if TYPE_CHECKING:
    from .s3.evict import StoreEvictor
    from .s3.index import SharedIndex
    from .s3.lease import HeldLease, Waited
    from .s3.shared import SharedStore
    from .s3.usage import StoreUsage


class RouteCounts(Protocol):
    """Where cache outcomes are counted (the metrics)."""

    def cache_outcome(self, route: str, outcome: str) -> None: ...


class NoCounts:
    def cache_outcome(self, route: str, outcome: str) -> None:
        pass


@attrs.frozen
class Asked:
    """One request as the cache sees it."""

    request: RegistryRequest
    repository: Repository
    # Hash of the client's own Authorization when clients' credentials are passed through;
    # None when the route holds credentials (or needs none): then the route's admission is
    # the access check.
    credential: str | None

    @property
    def route(self) -> str:
        return self.repository[0]

    @property
    def name(self) -> str:
        return self.repository[1]

    @property
    def is_manifest(self) -> bool:
        return self.request.target.kind is Kind.MANIFEST


@attrs.frozen
class Revalidated:
    status: int
    digest: str | None


class Cache:
    """The cache's long-lived state, shared by the fetchers of every routing snapshot."""

    log = Logger()

    def __init__(
        self,
        store: ObjectStore,
        downloads: Downloads,
        *,
        clock: IReactorTime,
        tag_ttl: float = 0.0,
        stale_max_age: float = 7 * 86400.0,
        idle_timeout: float = 60.0,
        public_ttl: float = 600.0,
        counts: RouteCounts | None = None,
        remote: RemoteDownloads | None = None,
        shared: SharedStore | None = None,
        shared_index: SharedIndex | None = None,
        usage: StoreUsage | None = None,
    ) -> None:
        # Downloads of other processes on the same directory, read along their files.
        self.remote = remote
        self.store = store
        self.index: Any = store.index if shared_index is None else shared_index
        self.downloads = downloads
        self.clock = clock
        self.tag_ttl = tag_ttl
        self.stale_max_age = stale_max_age
        self.idle_timeout = idle_timeout
        self.counts: RouteCounts = counts if counts is not None else NoCounts()
        self.access = AccessMemory(clock, public_ttl=public_ttl)
        self.hot = HotObjects()
        # Per (digest, Content-Type): the headers of a whole answer, built once.
        self.answer_headers: dict[tuple[str, bytes], Headers] = {}
        self.revalidating: SingleFlight[tuple[str, ...], Revalidated] = SingleFlight()
        # Whether R holds a digest stored for another repository: one HEAD at a time.
        self.confirming: SingleFlight[tuple[str, ...], bool] = SingleFlight()
        # Per download: the client headers of the upstream's answer, for joiners.
        self.download_headers: dict[Download, Headers] = {}
        self.download_repository: dict[Download, Repository] = {}
        self.children_recorded: set[tuple[str, str, str]] = set()
        # Manifest digest -> its Content-Type (the upstream's, else from its bytes).
        self.media_types: dict[str, bytes] = {}
        # The shared object store (--cache-store) behind the local tier, and its index.
        self.shared = shared
        self.shared_index = shared_index
        # Leases this replica holds, and the downloads they are uploaded with.
        self.leases: dict[str, HeldLease] = {}
        self.uploading: dict[Download, HeldLease] = {}
        # Digest -> when the shared store was last seen to hold it (blob redirects).
        self.in_store: dict[str, float] = {}
        # Digest -> when a whole blob was last streamed from the store past the local tier.
        self.streamed: dict[str, float] = {}
        # One wait for another replica's download per digest.
        self.waiting: SingleFlight[str, Waited] = SingleFlight()
        # When objects are served and what the store holds (eviction's bookkeeping), the
        # eviction runs (``s3.evict``: set when the store has a bound), and the digests this
        # replica reads from the store right now (never evicted under it).
        self.usage = usage
        self.store_evictor: StoreEvictor | None = None
        self.store_reads: dict[str, int] = {}

    def busy_in_store(self, digest: str) -> bool:
        """Whether this replica reads ``digest`` from the store, or downloads it, now."""
        return digest in self.store_reads or self.downloads.get(digest) is not None

    def evicted_from_store(self, digest: str) -> None:
        self.in_store.pop(digest, None)


def announced_headers(answer: Answer) -> list[tuple[bytes, bytes]]:
    """What readers in other processes need of the upstream's answer: its Content-Type."""
    content_type = answer.header(b"content-type")
    return [(b"content-type", content_type)] if content_type is not None else []


def guarded(source: Deferred[Any], on_cancel: Callable[[], None]) -> Deferred[Any]:
    """A Deferred following ``source`` that may be cancelled (the client left) without
    cancelling ``source``, which others share or which fires later on its own schedule:
    cancelling runs ``on_cancel`` instead."""
    waiter: Deferred[Any] = Deferred(lambda _: on_cancel())

    def forward(result: object) -> None:
        if not waiter.called:
            waiter.callback(result) if not isinstance(result, Failure) else waiter.errback(result)

    source.addBoth(forward)
    return waiter
