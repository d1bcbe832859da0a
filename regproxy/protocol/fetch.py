"""The one fetch interface: a request for registry content in, an :class:`Answer` out.

The upstream path (:class:`regproxy.upstream.fetcher.UpstreamFetcher`) and the cache
(:class:`regproxy.cache.fetcher.CachingFetcher`, a decorator around any fetcher) implement
it, so the web layer cannot tell a cached route from a plain one, and the cache never calls
back into its caller. Only the web layer writes an answer to a client
(:mod:`regproxy.web.answer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.http_headers import Headers

from .reference import RegistryPath

if TYPE_CHECKING:
    from ..config import Route
    from .mount import Mount


@attrs.frozen
class RegistryRequest:
    """A validated client request for registry content, with the route that serves it.

    ``target`` names the repository within the route; ``client_target`` as the client named
    it (they differ under a path route). ``whole_object`` asks for the object itself, as a
    cache needs it: no Range, and blob redirects followed whatever the route says.
    """

    method: bytes
    route: Route
    mount: Mount
    target: RegistryPath
    client_target: RegistryPath
    headers: Headers = attrs.field(eq=False)
    raw_query: bytes = b""
    client_host: bytes = b""
    # The proxy's public base URL as this client reached it, derived only when an upstream
    # answer must be rewritten (a cache hit never needs it).
    base_url: Callable[[], str] = attrs.field(default=lambda: "", eq=False)
    whole_object: bool = False

    @property
    def public_base(self) -> str:
        return self.base_url()

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def authorization(self) -> bytes | None:
        """The client's own Authorization (passed upstream only where the route holds none)."""
        return self.header(b"authorization")


class Body(Protocol):
    """An answer's body, delivered once to a consumer with backpressure.

    ``deliver`` registers the body as the consumer's streaming producer, writes, unregisters
    and fires with the bytes written when the body is complete; it fails when the body
    cannot be completed (the writer then drops the client connection, so a cut body is
    never taken for a whole one). Cancelling it (the client left) stops the source.
    ``discard`` releases a body that will not be delivered (a HEAD, an error).
    """

    @property
    def length(self) -> int | None: ...

    def deliver(self, consumer: IConsumer) -> Deferred[int]: ...

    def discard(self) -> None: ...


@attrs.define
class BytesBody:
    """A small body already in memory (rewritten lists, errors, manifests from the store)."""

    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)

    def deliver(self, consumer: IConsumer) -> Deferred[int]:
        consumer.write(self.data)
        return succeed(len(self.data))

    def discard(self) -> None:
        pass


@attrs.frozen
class Answer:
    """What a fetcher answers: status, headers (already as the client must see them) and a
    body; plus what the request record wants to know of how it was obtained."""

    status: int
    headers: Headers = attrs.field(factory=Headers, eq=False)
    body: Body | None = None
    phrase: bytes | None = None
    # Facts for the request record (the access log and metrics), never for the client.
    upstream_status: int | None = None
    upstream_seconds: float | None = None
    cache: str | None = None

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


class Fetcher(Protocol):
    """Anything that answers registry requests: the upstream, or a cache around it."""

    async def fetch(self, request: RegistryRequest) -> Answer: ...
