"""The periodic upstream check: does each route's upstream answer ``/v2/`` at all.

Its result is a metric (``regproxy_upstream_up``), never readiness (see
``regproxy.web.health``). The check itself goes through the one upstream client, so a
failing upstream also reaches the health log (``upstream_health``) like any request.

One check per proxy per interval, not one per process: under ``--workers`` only worker 1
checks (``checks_upstreams``). Its gauge lives in prometheus-client's multiprocess files
with the ``livemostrecent`` mode, so every worker's ``/metrics`` shows it. Worker 1 always
exists while the proxy serves (a worker that dies is restarted under its number). The
supervisor does not check: that would load the upstream client, TLS and credentials into
the one process that otherwise needs none of them.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from ..config import Route
from ..protocol.errors import OCIError
from ..protocol.headers import user_agent
from ..routing.snapshot import Routing
from ..upstream.client import UpstreamClient, UpstreamFailure
from ..web.observe import Metrics
from .handoff import WorkerSpec

HEALTH_CHECK_INTERVAL = 30.0
CHECK_BODY_LIMIT = 64 * 1024
# The worker of a supervisor that checks for the whole proxy.
CHECKING_WORKER = 1


def checks_upstreams(worker: WorkerSpec | None) -> bool:
    """Whether this process runs the periodic check: a single process, or worker 1."""
    return worker is None or worker.number == CHECKING_WORKER


def upstream_checks(
    routing: Callable[[], Routing], metrics: Metrics, *, clock: IReactorTime
) -> PeriodicCheck:
    """Every ``HEALTH_CHECK_INTERVAL``, check the upstreams of the routing then in force."""
    return PeriodicCheck(
        HEALTH_CHECK_INTERVAL,
        lambda: ensureDeferred(check_upstreams(routing(), metrics)),
        clock=clock,
    )


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
        return self._running.addErrback(self._unless_stopping)

    def _unless_stopping(self, failure: Failure) -> None:
        # A check cancelled by the stop ends in an error (CancelledError, inside
        # gatherResults' FirstError) that TimerService would log as unhandled.
        if not self._stopping:
            failure.raiseException()

    _stopping = False

    def stopService(self) -> Deferred[None]:
        self._stopping = True
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
