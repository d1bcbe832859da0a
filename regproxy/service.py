"""Composing the daemon: client, resources, listeners, health checks and graceful shutdown."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from treq.client import HTTPClient
from treq.content import content
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request

from .config import Config, Route
from .forward import Forwarder
from .listen import Listener, parse_endpoint
from .observe import ClientAddress, Metrics
from .signals import StopCleanlyOnSigterm
from .startup import StartupReport, holds_credentials
from .upstream.auth import UpstreamAuth
from .upstream.credentials import credential_source
from .upstream.http import make_client, make_pool
from .upstream.realm import RealmCache
from .web.browser import BrowserRedirect, NotFound
from .web.health import Health, Readiness
from .web.metrics import MetricsPage
from .web.public import public_base
from .web.registry import RegistryAPI
from .web.root import Root
from .web.site import ProxySite
from .web.token import TokenProxy

HEALTH_CHECK_INTERVAL = 30.0


class Drain(Service):
    """On stop: turn /readyz to 503 at once, let the listeners accept for ``delay`` seconds
    (they close themselves, see ``listen.Listener``), then wait for in-flight requests up to
    ``grace`` seconds, then close the upstream pool."""

    log = Logger()

    def __init__(
        self,
        *,
        site: ProxySite,
        readiness: Readiness,
        pool: HTTPConnectionPool,
        grace: float,
        reactor: Any,
        delay: float = 0.0,
    ) -> None:
        self.site = site
        self.readiness = readiness
        self.pool = pool
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
        await self.pool.closeCachedConnections()


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


async def check_upstream(
    client: HTTPClient, route: Route, metrics: Metrics, timeout: float
) -> None:
    """Record whether the upstream answers /v2/ at all: a metric, never readiness."""
    try:
        response = await client.get(
            route.upstream.origin + "/v2/", allow_redirects=False, unbuffered=True, timeout=timeout
        )
        await content(response)
        metrics.upstream_up.labels(route.name).set(1)
    except Exception:
        metrics.upstream_up.labels(route.name).set(0)


def build_root(
    config: Config,
    *,
    client: HTTPClient,
    clock: IReactorTime,
    metrics: Metrics,
    readiness: Readiness,
) -> Resource:
    """The whole resource tree, wired to ``client`` (tests hand in an in-memory one)."""
    route = config.default_route

    def route_for(request: Request) -> Route:
        return route

    sources = {
        r.name: source
        for r in config.routes
        if (source := credential_source(r.credentials)) is not None
    }
    auth = UpstreamAuth(
        client=client,
        clock=clock,
        sources=sources,
        timeout=config.upstream_timeout,
        on_fetch=lambda name, outcome: metrics.token_fetches.labels(name, outcome).inc(),
    )
    forwarder = Forwarder(
        client=client,
        clock=clock,
        public_base=lambda request: public_base(request, config),
        upstream_timeout=config.upstream_timeout,
        idle_timeout=config.idle_timeout,
        credentials=auth.authorization,
        answer_challenge=auth.answer,
    )
    root = Root(BrowserRedirect(route_for, not config.disable_browser_redirects))
    root.putChild(b"v2", RegistryAPI(route_for, forwarder))
    root.putChild(
        b"_token",
        TokenProxy(
            route_for=route_for,
            realms=RealmCache(client, clock, config.upstream_timeout),
            client=client,
            clock=clock,
            timeout=config.upstream_timeout,
            idle_timeout=config.idle_timeout,
        ),
    )
    root.putChild(b"healthz", Health())
    root.putChild(b"readyz", Health(readiness))
    # With a metrics listener of its own, the public one keeps /metrics free.
    root.putChild(
        b"metrics", MetricsPage(metrics) if config.metrics_listen is None else NotFound()
    )
    return root


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
    environ: Mapping[str, str] | None = None,
) -> MultiService:
    """The daemon. Endpoint descriptions are parsed here, so a bad one is a StartupError
    before anything runs; binding happens when the service starts. ``environ`` is the
    start-up environment, for saying what a supervisor did not hand over."""
    route = config.default_route
    listen_endpoints = [(parse_endpoint(reactor, "--port", d, environ), d) for d in config.listen]
    metrics_endpoint = (
        None
        if config.metrics_listen is None
        else parse_endpoint(reactor, "--metrics-port", config.metrics_listen, environ)
    )
    pool = make_pool(reactor)
    client = make_client(reactor, pool=pool, ca_file=route.upstream_ca)
    metrics = Metrics()
    readiness = Readiness()
    root = build_root(config, client=client, clock=reactor, metrics=metrics, readiness=readiness)
    site = ProxySite(root, metrics=metrics, client_address=ClientAddress(config.trusted_proxies))

    top = MultiService()
    # First, so that its lines come before the listeners'.
    StartupReport(config, warnings=warnings).setServiceParent(top)
    drain = Drain(
        site=site,
        readiness=readiness,
        pool=pool,
        grace=config.shutdown_grace,
        reactor=reactor,
        delay=config.drain_delay,
    )
    drain.setServiceParent(top)
    if handle_sigterm:
        StopCleanlyOnSigterm(reactor).setServiceParent(top)
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
        metrics_site = ProxySite(metrics_root, metrics=metrics, client_address=ClientAddress(()))
        Listener(
            option="--metrics-port",
            description=str(config.metrics_listen),
            endpoint=metrics_endpoint,
            factory=metrics_site,
            reactor=reactor,
            serves="metrics",
            close_delay=config.drain_delay,
        ).setServiceParent(top)
    PeriodicCheck(
        HEALTH_CHECK_INTERVAL,
        lambda: ensureDeferred(check_upstream(client, route, metrics, config.upstream_timeout)),
        clock=reactor,
    ).setServiceParent(top)
    return top
