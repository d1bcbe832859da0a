"""Graceful shutdown: readiness first, listeners after the drain delay, then the grace."""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
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
    errors: list[dict[str, Any]] = []
    observer = lambda event: errors.append(event) if event.get("isError") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        service.stopService().addBoth(stopped.append)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert stopped == [None]
    assert checks[0].called  # cancelled, not waited for
    assert errors == []  # the cancellation is no "Unhandled Error"


class SlowClient(FileDescriptor):
    """A client connection with Twisted's own write buffer and producer logic
    (``FileDescriptor``, what TCP and the stdlib TLS layer write through) over a socket that
    takes only what the client has made room for."""

    def __init__(self, reactor: MemoryReactorClock) -> None:
        super().__init__(reactor)
        self.connected = 1
        self.room = 0
        self.received = bytearray()
        self.closed = False

    def writeSomeData(self, data: bytes) -> int:
        taken = min(len(data), self.room)
        self.room -= taken
        self.received += data[:taken]
        return taken

    def reads(self, count: int) -> None:
        """The client reads ``count`` bytes; the reactor calls doWrite as it would."""
        self.room += count
        lost = self.doWrite()
        if lost is not None and not self.closed:
            self.closed = True
            self.connectionLost(Failure(lost))
            assert self.protocol is not None
            self.protocol.connectionLost(Failure(lost))

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 5000)


class Blob(Resource):
    isLeaf = True
    body = b"x" * 200_000  # more than a transport buffers before it pauses its producer

    def render_GET(self, request: Any) -> bytes:
        return self.body


def connected(site: ProxySite, clock: MemoryReactorClock) -> tuple[Any, SlowClient]:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert channel is not None
    channel.callLater = clock.callLater  # type: ignore[attr-defined]
    transport = SlowClient(clock)
    transport.protocol = channel
    channel.makeConnection(transport)
    return channel, transport


def test_a_finished_download_s_connection_closes_once_its_buffer_flushes() -> None:
    """The last bytes of a finished download still buffered (the transport paused its
    producer, the channel): the drain ends when they are sent, not at the grace's end."""
    clock, readiness, pool = MemoryReactorClock(), Readiness(), Pool()
    site = ProxySite(Blob(), metrics=Metrics(), client_address=ClientAddress(()))
    service = Drain(site=site, readiness=readiness, pools=[pool], grace=20, reactor=clock)
    service.startService()
    channel, client = connected(site, clock)
    channel.dataReceived(b"GET /blob HTTP/1.1\r\nHost: proxy\r\n\r\n")
    assert site.active == 0  # answered: every byte is in the connection's buffer
    assert client.producerPaused  # ... more than it holds before it pauses the channel
    done: list[object] = []
    service.stopService().addBoth(done.append)
    assert not done and not client.closed  # the buffer has not flushed yet: shutdown waits
    client.reads(10**6)
    assert client.closed
    assert client.received.endswith(Blob.body)
    clock.advance(0.05)
    assert done == [None] and pool.closed


def test_an_idle_keep_alive_connection_does_not_hold_the_drain() -> None:
    clock, readiness, pool = MemoryReactorClock(), Readiness(), Pool()
    site = ProxySite(Blob(), metrics=Metrics(), client_address=ClientAddress(()))
    service = Drain(site=site, readiness=readiness, pools=[pool], grace=20, reactor=clock)
    service.startService()
    channel, client = connected(site, clock)
    channel.dataReceived(b"GET /blob HTTP/1.1\r\nHost: proxy\r\n\r\n")
    client.reads(10**6)  # the whole answer read; the connection stays open, between requests
    assert not client.closed and site.open_channels
    done: list[object] = []
    service.stopService().addBoth(done.append)
    client.reads(0)  # the reactor finds the socket writable
    assert client.closed and not site.open_channels
    clock.advance(0.05)
    assert done == [None] and pool.closed


def test_connections_still_flushing_at_the_grace_s_end_are_said() -> None:
    clock, readiness, pool = MemoryReactorClock(), Readiness(), Pool()
    site = ProxySite(Blob(), metrics=Metrics(), client_address=ClientAddress(()))
    service = Drain(site=site, readiness=readiness, pools=[pool], grace=1, reactor=clock)
    service.startService()
    channel, _client = connected(site, clock)
    channel.dataReceived(b"GET /blob HTTP/1.1\r\nHost: proxy\r\n\r\n")
    done: list[object] = []
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        service.stopService().addBoth(done.append)
        clock.pump([0.05] * 21)  # a client that never reads
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert done == [None] and pool.closed
    assert any("still flushing" in (event.get("log_format") or "") for event in events)


def test_every_upstream_pool_is_closed_follow_mode_s_too() -> None:
    clock, readiness, pools = Clock(), Readiness(), [Pool(), Pool()]
    site = ProxySite(Resource(), metrics=Metrics(), client_address=ClientAddress(()))
    service = Drain(site=site, readiness=readiness, pools=pools, grace=1, reactor=clock)
    service.startService()
    done: list[object] = []
    service.stopService().addBoth(done.append)
    assert done == [None]
    assert all(pool.closed for pool in pools)
