"""Graceful shutdown: readiness first, listeners after the drain delay, then the grace."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from regproxy.server.drain import Drain
from regproxy.server.signals import StopCleanlyOnSigterm
from regproxy.web.health import Readiness
from regproxy.web.observe import ClientAddress, Metrics
from regproxy.web.site import ProxySite


class Pool:
    closed = False

    def closeCachedConnections(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


def drain(delay: float, grace: float = 30.0) -> tuple[Drain, Clock, Readiness, Pool, ProxySite]:
    clock, readiness, pool = Clock(), Readiness(), Pool()
    site = ProxySite(Resource(), metrics=Metrics(), client_address=ClientAddress(()))
    service = Drain(
        site=site, readiness=readiness, pools=[pool], grace=grace, reactor=clock, delay=delay
    )
    service.startService()
    return service, clock, readiness, pool, site


def test_readiness_turns_at_once_and_the_grace_starts_after_the_delay() -> None:
    service, clock, readiness, pool, site = drain(delay=5, grace=10)
    site.active = 1
    done: list[object] = []
    service.stopService().addBoth(done.append)
    assert readiness.draining
    clock.advance(5)  # the delay: still accepting, nothing waited for yet
    clock.pump([0.1] * 95)  # 9.5 s of the grace
    assert not done and not pool.closed
    site.active = 0
    clock.advance(0.1)
    assert done == [None] and pool.closed and service.drained


def test_grace_over_with_requests_left() -> None:
    service, clock, _, pool, site = drain(delay=0, grace=1)
    site.active = 2
    done: list[object] = []
    service.stopService().addBoth(done.append)
    clock.pump([0.1] * 11)
    assert done == [None] and pool.closed and not service.drained


def test_an_idle_drain_without_delay_finishes_at_once() -> None:
    service, _, readiness, pool, _ = drain(delay=0)
    done: list[object] = []
    service.stopService().addBoth(done.append)
    assert done == [None] and readiness.draining and pool.closed


class Reactor:
    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.when_running: list[Any] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls.append(f)

    def callWhenRunning(self, f: Any) -> None:
        self.when_running.append(f)

    def stop(self) -> None:
        pass


def test_sigterm_stops_the_reactor_once_and_deafens_the_process() -> None:
    reactor = Reactor()
    deafened: list[bool] = []
    stopper = StopCleanlyOnSigterm(reactor, deafen=lambda: deafened.append(True))
    stopper.sigterm(15)
    stopper.sigterm(15)
    assert reactor.calls == [reactor.stop]
    # Python restores the default action while it shuts down: only an ignored signal
    # cannot kill a process that is already stopping.
    assert deafened == [True]


def test_deafening_ignores_stop_signals_at_the_kernel() -> None:
    import signal

    from regproxy.server.signals import stop_hearing_stop_signals

    saved = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop_hearing_stop_signals()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def test_a_periodic_check_in_progress_is_cancelled_on_stop() -> None:
    from regproxy.server.upstream_check import PeriodicCheck

    clock = Clock()
    checks: list[Deferred[None]] = []

    def check() -> Deferred[None]:
        checks.append(Deferred())
        return checks[-1]

    service = PeriodicCheck(30.0, check, clock=clock)
    service.startService()
    assert len(checks) == 1 and not checks[0].called
    stopped: list[object] = []
    service.stopService().addBoth(stopped.append)
    assert stopped == [None]
    assert checks[0].called  # cancelled, not waited for
    checks[0].addErrback(lambda _: None)


class SlowClientTransport:
    """A connection whose last bytes are still in its write buffer."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.closing = False
        self.aborted = False

    def loseConnection(self) -> None:
        self.closing = True  # flushes first, closes later (see flushed)

    def abortConnection(self) -> None:
        self.aborted = True


def test_connections_are_closed_gracefully_so_their_buffers_flush() -> None:
    service, clock, _, pool, site = drain(delay=0, grace=10)

    class Channel:
        transport: Any = None

    channel = Channel()
    channel.transport = SlowClientTransport(channel)
    site.open_channels.add(channel)  # type: ignore[arg-type]
    done: list[object] = []
    service.stopService().addBoth(done.append)
    assert channel.transport.closing and not channel.transport.aborted
    clock.pump([0.05] * 20)
    assert not done  # the buffer has not flushed yet: shutdown waits
    site.open_channels.discard(channel)  # type: ignore[arg-type]  # flushed, closed
    clock.advance(0.05)
    assert done == [None] and pool.closed


def test_every_upstream_pool_is_closed_follow_mode_s_too() -> None:
    clock, readiness, pools = Clock(), Readiness(), [Pool(), Pool()]
    site = ProxySite(Resource(), metrics=Metrics(), client_address=ClientAddress(()))
    service = Drain(site=site, readiness=readiness, pools=pools, grace=1, reactor=clock)
    service.startService()
    done: list[object] = []
    service.stopService().addBoth(done.append)
    assert done == [None]
    assert all(pool.closed for pool in pools)
