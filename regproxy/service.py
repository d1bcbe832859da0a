"""Composing the daemon: the upstream clients, the cache, the resource tree, and the
process services of ``regproxy.server`` around them (listeners, drain, checks, reload)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.web.resource import Resource
from twisted.web.server import Request

from .access.gate import Gates, IdentityIssuer
from .access.limits import LoginThrottle, build_limiter
from .access.oidc import oidc_verifiers
from .cache.budget import OrphanBudget
from .cache.download import Downloads
from .cache.s3.client import s3_client
from .cache.s3.evict import StoreEvictor
from .cache.s3.index import SharedIndex
from .cache.s3.settings import StoreLocation
from .cache.s3.shared import SharedStore
from .cache.s3.usage import StoreUsage
from .cache.state import Cache
from .cache.store import CacheStore, open_store
from .cache.tail import RemoteDownloads, inotify_notifier
from .config import CacheConfig, Config, OIDCConfig, Route, Upstream
from .routing.matching import RouteTable
from .routing.snapshot import CurrentRouting, RoutingFactory
from .server.cache_upkeep import CacheUpkeep
from .server.drain import Drain
from .server.endpoints import ListenerEndpoints
from .server.handoff import WorkerSpec
from .server.listen import ALL_INTERFACES_WITH_CREDENTIALS, Listener
from .server.reload import RoutesReloader
from .server.signals import StopCleanlyOnSigterm
from .server.startup import StartupReport, holds_credentials
from .server.upstream_check import checks_upstreams, upstream_checks
from .server.upstream_health import HealthReport, UpstreamHealthLog
from .server.worker import WorkerRole
from .upstream.client import HealthObserver
from .upstream.credentials import RunInThread
from .upstream.treq_client import UpstreamPool, make_client, make_pool
from .web.browser import BrowserRedirect, NotFound
from .web.health import Health, Readiness
from .web.metrics import MetricsPage
from .web.observe import ClientAddress, Metrics, PrometheusCacheMetrics
from .web.public import public_base
from .web.registry import RegistryAPI
from .web.root import Root
from .web.site import ProxySite
from .web.token import TokenProxy


def build_root(
    config: Config,
    *,
    client: HTTPClient,
    clock: IReactorTime,
    metrics: Metrics,
    readiness: Readiness,
    follow_client: HTTPClient | None = None,
    health: HealthObserver | None = None,
    run_in_thread: RunInThread = deferToThread,
    http_for: Callable[[Route], HTTPClient] | None = None,
    follow_for: Callable[[Route], HTTPClient] | None = None,
    cache: Cache | None = None,
    gates: Gates | None = None,
    shared_directory: str | None = None,
    pool: UpstreamPool | None = None,
) -> Root:
    """The whole resource tree, wired to ``client`` (tests hand in an in-memory one).

    ``http_for`` gives routes with a TLS trust of their own their client, ``follow_for``
    the client that fetches their blob redirects in follow mode (the service's endpoints
    refuse non-public addresses; tests of the follow logic use ``client``). The routing in
    force is ``root.routing``, which a reload swaps.
    """

    def base(request: Request) -> str:
        return public_base(request, config)

    factory = RoutingFactory(
        clock=clock,
        timeout=config.upstream_timeout,
        idle_timeout=config.idle_timeout,
        http_for=http_for or (lambda route: client),
        follow_for=follow_for or (lambda route: follow_client or client),
        public_base=base,
        run_in_thread=run_in_thread,
        on_token_fetch=lambda name, outcome: metrics.token_fetches.labels(name, outcome).inc(),
        health=health,
        cache=cache,
    )
    current = CurrentRouting(
        factory.build(RouteTable(config.routes, auth=config.auth, limits=config.limits))
    )
    if gates is None:
        gates = access_gates(
            config, clock, metrics, run_in_thread, shared_directory=shared_directory, pool=pool
        )
    # Built now, so that a configuration that cannot be served fails at start-up.
    gates(current().table)

    def browser_route(request: Request, path: str) -> tuple[Route, str] | None:
        host = request.requestHeaders.getRawHeaders(b"host", [b""])[0].decode("latin-1")
        match = current().table.match(host, None, path.strip("/") or None)
        if match is None or not match.allowed:
            return None  # no route's page, or one the allow-list hides
        return match.route, match.name

    root = Root(BrowserRedirect(browser_route, not config.disable_browser_redirects))
    root.routing = current
    root.routing_factory = factory
    root.gates = gates
    root.putChild(b"v2", RegistryAPI(current, base, gates))
    root.putChild(b"_token", TokenProxy(routing=current, public_base=base, gates=gates))
    root.putChild(b"healthz", Health())
    root.putChild(b"readyz", Health(readiness))
    # With a metrics listener of its own, the public one keeps /metrics free.
    root.putChild(
        b"metrics", MetricsPage(metrics) if config.metrics_listen is None else NotFound()
    )
    return root


def access_gates(
    config: Config,
    reactor: Any,
    metrics: Metrics,
    run_blocking: Any,
    *,
    shared_directory: str | None = None,
    pool: UpstreamPool | None = None,
) -> Gates:
    """The access state of each routing snapshot ([auth] and [limits] of the routes).

    ``shared_directory`` is the one the workers of a supervisor share: their rate-limit
    counts are kept there, so the limits hold for the proxy as a whole.
    """
    return Gates(
        clock=reactor.seconds,
        run_blocking=run_blocking,
        issuers_for=OIDCIssuers(reactor, pool),
        throttle=LoginThrottle(reactor),
        limiter_for=lambda limits: build_limiter(limits, reactor, shared_directory),
        insecure=config.auth is not None and config.auth.insecure,
        count=metrics.authentication,
    )


class OIDCIssuers:
    """[[auth.oidc]] verifiers, one per provider configuration for the process's life, so
    a reload that keeps a provider keeps its cached keys."""

    def __init__(self, reactor: Any, pool: UpstreamPool | None) -> None:
        self._reactor = reactor
        self._pool = pool
        self._verifiers: dict[OIDCConfig, IdentityIssuer] = {}

    def __call__(self, configs: Sequence[OIDCConfig]) -> dict[str, IdentityIssuer]:
        for config in configs:
            if config not in self._verifiers:
                made = oidc_verifiers([config], self._reactor, pool=self._pool)
                self._verifiers[config] = made[config.name]
        return {config.name: self._verifiers[config] for config in configs}


def client_factories(
    reactor: Any, pool: UpstreamPool, follow_pool: UpstreamPool
) -> tuple[Callable[[Route], HTTPClient], Callable[[Route], HTTPClient]]:
    """One HTTP client per TLS trust, and one follow-mode client per upstream; made once.

    Followed redirects have a pool of their own: a pooled connection is reused by host and
    port without asking the endpoint again, so sharing one pool would let a connection made
    without the address check serve a redirect target (or the reverse).
    """
    clients: dict[str | None, HTTPClient] = {}
    follows: dict[tuple[str | None, Upstream], HTTPClient] = {}

    def http_for(route: Route) -> HTTPClient:
        if route.upstream_ca not in clients:
            clients[route.upstream_ca] = make_client(reactor, pool=pool, ca_file=route.upstream_ca)
        return clients[route.upstream_ca]

    def follow_for(route: Route) -> HTTPClient:
        key = (route.upstream_ca, route.upstream)
        if key not in follows:
            follows[key] = make_client(
                reactor,
                pool=follow_pool,
                ca_file=route.upstream_ca,
                guard_redirects_from=route.upstream,
            )
        return follows[key]

    return http_for, follow_for


def build_cache(
    config: Config, metrics: Metrics, reactor: Any, thread_pool: RunInThread
) -> tuple[CacheStore | None, Cache | None]:
    """The pull-through cache of --cache-dir, its store opened (and cleaned up) now."""
    if config.cache is None:
        return None, None
    settings = config.cache
    timing = settings.store_timing
    store = open_store(
        settings.directory,
        max_size=settings.max_size,
        metrics=PrometheusCacheMetrics(metrics),
        # Tag ages are compared with the fetcher's clock: one clock for both.
        clock=reactor.seconds,
    )
    downloads = Downloads(
        store,
        clock=reactor,
        run_blocking=thread_pool,
        orphan_budget=OrphanBudget(settings.abandoned_limit),
    )
    shared, shared_index = _shared_store(settings, store, reactor)
    # Served records and the total are kept only for a bound: without one, the bucket's
    # lifecycle rules bound the store and they would be PUTs for nothing.
    usage = (
        StoreUsage(shared, served_every=timing.served_every)
        if shared is not None and settings.store_max_size is not None
        else None
    )
    cache = Cache(
        store,
        downloads,
        shared=shared,
        shared_index=shared_index,
        usage=usage,
        clock=reactor,
        tag_ttl=settings.tag_ttl,
        stale_max_age=settings.stale_max_age,
        idle_timeout=config.idle_timeout,
        public_ttl=settings.public_ttl,
        counts=metrics,
        remote=RemoteDownloads(
            store, downloads, clock=reactor, notifier=inotify_notifier(reactor)
        ),
    )
    if shared is not None and usage is not None and settings.store_max_size is not None:
        cache.store_evictor = StoreEvictor(
            shared,
            usage,
            max_size=settings.store_max_size,
            busy=cache.busy_in_store,
            on_evicted=cache.evicted_from_store,
            every=timing.evict_every,
            min_idle=timing.evict_min_idle,
        )
    return store, cache


def _shared_store(
    settings: CacheConfig, store: CacheStore, reactor: Any
) -> tuple[SharedStore | None, SharedIndex | None]:
    """The object store of --cache-store behind the directory's store, if given."""
    if settings.store is None:
        return None, None
    client = s3_client(reactor, StoreLocation.parse(settings.store))
    replica = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    shared = SharedStore(
        client, clock=reactor, replica=replica, lease_ttl=settings.store_timing.lease_ttl
    )
    return shared, SharedIndex(store.index, shared)


def build_service(
    config: Config,
    reactor: Any,
    *,
    handle_sigterm: bool = False,
    warnings: Sequence[str] = (),
    worker: WorkerSpec | None = None,
    environ: Mapping[str, str] | None = None,
) -> MultiService:
    """The daemon. Endpoint descriptions are parsed here, so a bad one is a StartupError
    before anything runs; binding happens when the service starts. In a ``--workers``
    worker, the endpoints are the supervisor's sockets, in the order of the descriptions.
    ``environ`` is the start-up environment, for saying what a supervisor did not hand
    over."""
    endpoints = ListenerEndpoints(reactor, worker, environ)
    listen_endpoints = [(endpoints.endpoint("--port", d), d) for d in config.listen]
    metrics_endpoint = (
        None
        if config.metrics_listen is None
        else endpoints.endpoint("--metrics-port", config.metrics_listen)
    )
    pool = make_pool(reactor)
    follow_pool = make_pool(reactor)
    http_for, follow_for = client_factories(reactor, pool, follow_pool)
    metrics = Metrics(multiprocess=worker is not None)
    readiness = Readiness()
    thread_pool = lambda work: deferToThreadPool(reactor, reactor.getThreadPool(), work)  # noqa: E731
    cache_store, cache = build_cache(config, metrics, reactor, thread_pool)
    routing: list[CurrentRouting] = []  # filled once the tree exists

    def upstream_of(name: str) -> Upstream | None:
        route = routing[0]().table.by_name(name) if routing else None
        return route.upstream if route is not None else None

    health_log = UpstreamHealthLog(reactor)
    # What fails while the process stops (a lookup whose thread pool stopped) is not the
    # upstream failing.
    reactor.addSystemEventTrigger("before", "shutdown", health_log.quiet)
    root = build_root(
        config,
        client=http_for(config.default_route),
        clock=reactor,
        metrics=metrics,
        readiness=readiness,
        http_for=http_for,
        follow_for=follow_for,
        # A failing upstream is logged once per route and kind, summarised, and its recovery.
        health=HealthReport(health_log, upstream_of),
        cache=cache,
        run_in_thread=thread_pool,
        shared_directory=(worker.runtime_dir or None) if worker is not None else None,
        pool=pool,
    )
    routing.append(root.routing)
    site = ProxySite(
        root,
        metrics=metrics,
        client_address=ClientAddress(config.trusted_proxies),
        idle_timeout=config.idle_timeout,
    )

    top = MultiService()
    # First, so that its lines come before the listeners'. A worker's supervisor said it
    # (and where the workers listen) once for all of them.
    if worker is None:
        StartupReport(config, warnings=warnings).setServiceParent(top)
    drain = Drain(
        site=site,
        readiness=readiness,
        pools=(pool, follow_pool),
        grace=config.shutdown_grace,
        reactor=reactor,
        delay=config.drain_delay,
    )
    drain.setServiceParent(top)
    if handle_sigterm:
        StopCleanlyOnSigterm(reactor).setServiceParent(top)
    if worker is not None:
        site.worker = worker.number
        # After the SIGTERM handler is in place: the worker unblocks held signals when it
        # runs, and a SIGTERM held since its start must reach that handler.
        # A routes file means SIGHUP reloads (RoutesReloader); otherwise the worker takes it.
        WorkerRole(worker, reactor, hangup=config.routes_file is None).attach(top)
    # With [auth] the proxy decides who pulls: listening everywhere is what it is for.
    credentials_held = holds_credentials(config) and config.auth is None
    for endpoint, description in listen_endpoints:
        Listener(
            option="--port",
            description=description,
            endpoint=endpoint,
            factory=site,
            reactor=reactor,
            close_delay=config.drain_delay,
            warn_all_interfaces=ALL_INTERFACES_WITH_CREDENTIALS if credentials_held else None,
            report=worker is None,
        ).setServiceParent(top)
    if metrics_endpoint is not None:
        metrics_root = Resource()
        metrics_root.putChild(b"metrics", MetricsPage(metrics))
        metrics_site = ProxySite(
            metrics_root,
            metrics=metrics,
            client_address=ClientAddress(()),
            idle_timeout=config.idle_timeout,
        )
        Listener(
            option="--metrics-port",
            description=str(config.metrics_listen),
            endpoint=metrics_endpoint,
            factory=metrics_site,
            reactor=reactor,
            serves="metrics",
            close_delay=config.drain_delay,
            report=worker is None,
        ).setServiceParent(top)
    if cache_store is not None and config.cache is not None:
        CacheUpkeep(
            cache_store,
            reactor,
            thread_pool,
            verify=config.cache.verify,
            scrub_interval=config.cache.scrub_interval,
        ).setServiceParent(top)
    if cache is not None and cache.store_evictor is not None:
        cache.store_evictor.setServiceParent(top)
    if config.routes_file is not None:
        RoutesReloader(
            config.routes_file, root.routing, root.routing_factory, reactor, root.gates
        ).setServiceParent(top)
    if checks_upstreams(worker):
        upstream_checks(root.routing, metrics, clock=reactor).setServiceParent(top)
    return top
