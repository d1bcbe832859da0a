"""The routes in force, with everything each one needs, swapped whole on reload.

A :class:`Routing` is built from one :class:`~regproxy.routing.matching.RouteTable`: the upstream
client (with a TLS trust per route), the proxy's credentials per route, the realms learnt
per route, and the fetcher that answers registry requests (the upstream, behind the cache
when there is one). Requests take the snapshot in force when they arrive and keep it
to the end, so a reload (SIGHUP) never changes a transfer in flight; a reload that fails
leaves the snapshot in force untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from ..cache.fetcher import CachingFetcher
from ..cache.state import Cache
from ..config import Route
from ..protocol.fetch import Fetcher
from ..upstream.auth import UpstreamAuth
from ..upstream.client import HealthObserver, UpstreamClient
from ..upstream.credentials import (
    AnonymousTokens,
    CredentialSource,
    RunInThread,
    credential_source,
)
from ..upstream.fetcher import UpstreamFetcher
from ..upstream.realm import RealmCache
from .matching import RouteTable


@attrs.frozen
class Routing:
    table: RouteTable
    upstream: UpstreamClient
    auth: UpstreamAuth
    realms: RealmCache
    fetcher: Fetcher


@attrs.frozen
class RoutingFactory:
    """Builds a :class:`Routing` for a route table; the parts that outlive one are here."""

    clock: IReactorTime
    timeout: float
    idle_timeout: float
    # (route) -> the HTTP client for its upstream, and for its followed blob redirects.
    http_for: Callable[[Route], HTTPClient]
    follow_for: Callable[[Route], HTTPClient]
    public_base: Callable[[Request], str]
    run_in_thread: RunInThread
    on_token_fetch: Callable[[str, str], None]
    health: HealthObserver | None = None
    cache: Cache | None = None

    def build(self, table: RouteTable) -> Routing:
        clients = {route.name: self.http_for(route) for route in table.routes}
        default = next(iter(clients.values()))
        upstream = UpstreamClient(
            default,
            clock=self.clock,
            timeout=self.timeout,
            idle_timeout=self.idle_timeout,
            health=self.health,
            per_route=clients,
        )
        sources: dict[str, CredentialSource] = {
            route.name: source
            for route in table.routes
            if (source := credential_source(route.credentials, self.run_in_thread)) is not None
        }
        if table.auth is not None:
            # Client credentials never go upstream with [auth]: the proxy fetches the
            # anonymous tokens of routes that hold no credentials itself.
            for route in table.routes:
                sources.setdefault(route.name, AnonymousTokens())
        auth = UpstreamAuth(upstream=upstream, sources=sources, on_fetch=self.on_token_fetch)
        follow = {route.name: self.follow_for(route) for route in table.routes}
        fetcher: Fetcher = UpstreamFetcher(upstream=upstream, auth=auth, follow_http=follow)
        if self.cache is not None:
            fetcher = CachingFetcher(self.cache, fetcher, holds_credentials=auth.configured)
        return Routing(
            table=table,
            upstream=upstream,
            auth=auth,
            realms=RealmCache(upstream),
            fetcher=fetcher,
        )


class CurrentRouting:
    """Holds the routing in force; ``swap`` installs a new one for new requests only."""

    log = Logger()

    def __init__(self, routing: Routing) -> None:
        self._routing = routing

    def __call__(self) -> Routing:
        return self._routing

    def swap(self, routing: Routing) -> None:
        self._routing = routing
        self.log.info(
            "routes in force: {names}", names=", ".join(r.name for r in routing.table.routes)
        )
