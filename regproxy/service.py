"""Composing the daemon: client, resources, listeners, health checks and graceful shutdown."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from treq.client import HTTPClient
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request

from .cache.download import Downloads
from .cache.fetcher import CachingFetcher
from .cache.store import open_store, verify_in_background
from .config import Config, Route, Upstream
from .listen import Listener
from .protocol.errors import OCIError
from .reload import RoutesReloader
from .routing.matching import RouteTable
from .routing.snapshot import CurrentRouting, Routing, RoutingFactory
from .signals import StopCleanlyOnSigterm
from .startup import StartupReport, holds_credentials
from .upstream.agent import UpstreamPool
from .upstream.client import HealthObserver, UpstreamClient, UpstreamFailure, user_agent
from .upstream.credentials import RunInThread
from .upstream.http import make_client, make_pool
from .upstream_health import HealthReport, UpstreamHealthLog
from .web.browser import BrowserRedirect, NotFound
from .web.health import Health, Readiness
from .web.metrics import MetricsPage
from .web.observe import ClientAddress, Metrics, PrometheusCacheMetrics
from .web.public import public_base
from .web.registry import RegistryAPI
from .web.root import Root
from .web.site import ProxySite
from .web.token import TokenProxy
from .workers import ListenerEndpoints, WorkerRole, WorkerSpec

HEALTH_CHECK_INTERVAL = 30.0
CACHE_RESCAN_INTERVAL = 60.0
CHECK_BODY_LIMIT = 64 * 1024


class Drain(Service):
    """On stop: turn /readyz to 503 at once, let the listeners accept for ``delay`` seconds
    (they close themselves, see ``listen.Listener``), then wait for in-flight requests up to
    ``grace`` seconds, then close the upstream pools (forwarding, and follow mode's)."""

    log = Logger()

    def __init__(
        self,
        *,
        site: ProxySite,
        readiness: Readiness,
        pools: Sequence[UpstreamPool],
        grace: float,
        reactor: Any,
        delay: float = 0.0,
    ) -> None:
        self.site = site
        self.readiness = readiness
        self.pools = tuple(pools)
        self.grace = grace
        self.reactor = reactor
        self.delay = delay
        # False when the grace period ended with requests unfinished.
        self.drained = True

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.readiness.draining = True
        return ensureDeferred(self._drain())

    async def _drain(self) -> None:
        if self.delay:
            self.log.info(
                "draining: /readyz answers 503; still accepting for {delay} seconds",
                delay=self.delay,
            )
            await deferLater(self.reactor, self.delay, lambda: None)
        deadline = self.reactor.seconds() + self.grace
        if self.site.active:
            self.log.info(
                "draining {count} requests for up to {grace} seconds",
                count=self.site.active,
                grace=self.grace,
            )
        while self.site.active and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.1, lambda: None)
        if self.site.active:
            self.drained = False
            self.log.warn(
                "grace period over with {count} requests unfinished", count=self.site.active
            )
        # A finished request may still have its last bytes in the connection's write
        # buffer (a slow client): the reactor's shutdown would cut those connections at
        # once. Closing them gracefully first lets every buffer flush, within the grace.
        for channel in list(self.site.open_channels):
            if channel.transport is not None:
                channel.transport.loseConnection()
        while self.site.open_channels and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05, lambda: None)
        await gatherResults([pool.closeCachedConnections() for pool in self.pools])


class PeriodicCheck(TimerService):
    """A TimerService whose check in progress is cancelled on stop, not waited for.

    TimerService's stop waits for the call in progress: an upstream check that hangs
    (an address that accepts and never answers) would hold an idle process for the whole
    upstream timeout after SIGTERM.
    """

    def __init__(
        self, interval: float, check: Callable[[], Deferred[None]], *, clock: IReactorTime
    ) -> None:
        super().__init__(interval, self._run)
        self.check = check
        self.clock = clock
        self._running: Deferred[None] | None = None

    def _run(self) -> Deferred[None]:
        self._running = self.check()
        return self._running

    def stopService(self) -> Deferred[None]:
        if self._running is not None and not self._running.called:
            self._running.cancel()
        stopped: Deferred[None] = super().stopService()
        return stopped


async def check_upstreams(routing: Routing, metrics: Metrics) -> None:
    """Check every route's upstream, side by side."""
    await gatherResults(
        [
            ensureDeferred(check_upstream(routing.upstream, route, metrics))
            for route in routing.table.routes
        ]
    )


async def check_upstream(upstream: UpstreamClient, route: Route, metrics: Metrics) -> None:
    """Record whether the upstream answers /v2/ at all: a metric, never readiness."""
    try:
        await upstream.fetch(
            "GET",
            route.upstream.origin + "/v2/",
            headers=Headers({b"user-agent": [user_agent(b"-")]}),
            route=route.name,
            limit=CHECK_BODY_LIMIT,
        )
        metrics.upstream_up.labels(route.name).set(1)
    except (UpstreamFailure, OCIError):
        metrics.upstream_up.labels(route.name).set(0)


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
    cache: CachingFetcher | None = None,
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
    current = CurrentRouting(factory.build(RouteTable(config.routes)))

    def browser_route(request: Request, path: str) -> tuple[Route, str] | None:
        host = request.requestHeaders.getRawHeaders(b"host", [b""])[0].decode("latin-1")
        match = current().table.match(host, None, path.strip("/") or None)
        if match is None or not match.allowed:
            return None  # no route's page, or one the allow-list hides
        return match.route, match.name

    root = Root(BrowserRedirect(browser_route, not config.disable_browser_redirects))
    root.routing = current
    root.routing_factory = factory
    root.putChild(b"v2", RegistryAPI(current, base))
    root.putChild(b"_token", TokenProxy(routing=current, public_base=base))
    root.putChild(b"healthz", Health())
    root.putChild(b"readyz", Health(readiness))
    # With a metrics listener of its own, the public one keeps /metrics free.
    root.putChild(
        b"metrics", MetricsPage(metrics) if config.metrics_listen is None else NotFound()
    )
    return root


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
) -> CachingFetcher | None:
    """The pull-through cache of --cache-dir, its store opened (and cleaned up) now."""
    if config.cache is None:
        return None
    settings = config.cache
    store = open_store(
        settings.directory,
        max_size=settings.max_size,
        metrics=PrometheusCacheMetrics(metrics),
        # Tag ages are compared with the fetcher's clock: one clock for both.
        clock=reactor.seconds,
    )
    downloads = Downloads(store, clock=reactor, run_blocking=thread_pool)
    return CachingFetcher(
        store,
        downloads,
        clock=reactor,
        tag_ttl=settings.tag_ttl,
        stale_max_age=settings.stale_max_age,
        idle_timeout=config.idle_timeout,
        counts=metrics,
    )


class CacheUpkeep(Service):
    """Other processes on the same directory add and evict objects: rescan every
    ``CACHE_RESCAN_INTERVAL``; with ``--cache-verify``, rehash large objects once at start."""

    log = Logger()

    def __init__(
        self, cache: CachingFetcher, reactor: Any, thread_pool: RunInThread, *, verify: bool
    ) -> None:
        self.cache = cache
        self.reactor = reactor
        self.thread_pool = thread_pool
        self.verify = verify
        self._timer = TimerService(CACHE_RESCAN_INTERVAL, self._rescan)
        self._timer.clock = reactor

    def startService(self) -> None:
        super().startService()
        self._timer.startService()
        if self.verify:
            self.reactor.callWhenRunning(self._verify)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        return self._timer.stopService()  # type: ignore[no-any-return]

    def _rescan(self) -> None:
        self.cache.store.rescan()

    def _verify(self) -> None:
        def done(corrupt: list[str]) -> None:
            self.log.info("cache verified: {count} corrupt objects discarded", count=len(corrupt))

        # The runner returns what the work returns (deferToThreadPool does).
        runner: Any = self.thread_pool
        ensureDeferred(verify_in_background(self.cache.store, runner)).addCallback(done)


ALL_INTERFACES_WITH_CREDENTIALS = (
    "the proxy holds upstream credentials, so anyone who reaches this port pulls what they "
    "can read; bind one interface (tcp:8080:interface=127.0.0.1) or put access control "
    "in front"
)


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
    cache = build_cache(config, metrics, reactor, thread_pool)
    routing: list[CurrentRouting] = []  # filled once the tree exists

    def upstream_of(name: str) -> Upstream | None:
        route = routing[0]().table.by_name(name) if routing else None
        return route.upstream if route is not None else None

    root = build_root(
        config,
        client=http_for(config.default_route),
        clock=reactor,
        metrics=metrics,
        readiness=readiness,
        http_for=http_for,
        follow_for=follow_for,
        # A failing upstream is logged once per route and kind, summarised, and its recovery.
        health=HealthReport(UpstreamHealthLog(reactor), upstream_of),
        cache=cache,
        run_in_thread=thread_pool,
    )
    routing.append(root.routing)
    site = ProxySite(
        root,
        metrics=metrics,
        client_address=ClientAddress(config.trusted_proxies),
        idle_timeout=config.idle_timeout,
    )

    top = MultiService()
    # First, so that its lines come before the listeners'.
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
    credentials_held = holds_credentials(config)
    for endpoint, description in listen_endpoints:
        Listener(
            option="--port",
            description=description,
            endpoint=endpoint,
            factory=site,
            reactor=reactor,
            close_delay=config.drain_delay,
            warn_all_interfaces=ALL_INTERFACES_WITH_CREDENTIALS if credentials_held else None,
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
        ).setServiceParent(top)
    if cache is not None and config.cache is not None:
        CacheUpkeep(cache, reactor, thread_pool, verify=config.cache.verify).setServiceParent(top)
    if config.routes_file is not None:
        RoutesReloader(
            config.routes_file, root.routing, root.routing_factory, reactor
        ).setServiceParent(top)
    PeriodicCheck(
        HEALTH_CHECK_INTERVAL,
        lambda: ensureDeferred(check_upstreams(root.routing(), metrics)),
        clock=reactor,
    ).setServiceParent(top)
    return top
