"""``--workers N``: one supervisor binds every listener, N worker processes serve on them.

Why inherited sockets and not ``SO_REUSEPORT``: the supervisor binds each listener once (or
adopts systemd's socket), so every listener kind works alike (``tcp:``, ``ssl:``,
``systemd:``), a restarted worker serves the very same socket (connections that arrive
meanwhile wait in the backlog, none is refused), and nothing else on the host can bind the
port beside us. Workers adopt the descriptors with ``adoptStreamPort``; ``ssl:`` listeners
are wrapped in TLS inside each worker with the context factory Twisted's own endpoint parser
builds from the same description.

The supervisor never accepts a connection; it starts workers, restarts one that dies (with
back-off), forwards SIGTERM (each worker drains within the grace) and SIGHUP, and owns the
private directory where prometheus-client's multiprocess mode keeps every worker's metrics.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from prometheus_client import multiprocess
from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ServerEndpoint,
    serverFromString,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from .listen import parse_endpoint
from .listen_tls import CertificateFiles, TLSOver, served_files, server_context, stdlib_tls
from .signals import StopCleanlyOnSigterm
from .startup import StartupError

# The environment variable prometheus-client reads (at import) to switch to multiprocess mode.
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# Variables of systemd socket activation: they describe the supervisor's descriptors.
SYSTEMD_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
FIRST_CHILD_FD = 3
# Held (blocked) from a worker's start until its handlers are in place: a worker still
# importing would otherwise die of them instead of stopping cleanly (blocked signals stay
# pending across exec, and the mask is inherited).
HELD_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
PARENT_CHECK_INTERVAL = 1.0
# Restart back-off: the first restart after FIRST_DELAY, doubling up to MAX_DELAY while
# workers keep dying young; a worker that ran for STABLE_AFTER seconds resets it.
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
STABLE_AFTER = 30.0
# Beyond the workers' own grace: time for a worker to start, drain and exit.
KILL_MARGIN = 10.0


# -- the worker count ----------------------------------------------------------------------------


def cpus_available() -> int:
    """CPUs this process may use: its affinity mask, bounded by a cgroup v2 CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def worker_count(text: str) -> int:
    text = text.strip().lower()
    if text == "auto":
        return cpus_available()
    if not text.isdigit() or int(text) < 1:
        raise ValueError("give a positive number of processes, or 'auto' (one per CPU)")
    return int(text)


worker_count.coerceDoc = "A number of processes, or 'auto' for one per CPU."  # type: ignore[attr-defined]


# -- what a listener description binds ----------------------------------------------------------


@attrs.frozen
class ListenRequest:
    """What an endpoint would have asked the reactor for, learnt by parsing its description.

    ``kind`` is ``tcp`` (``tcp:``, ``tcp6:``), ``ssl`` (with its ``context_factory``), or
    ``adopted`` (``systemd:``: ``fd`` is our own duplicate of the inherited descriptor).
    """

    kind: str
    port: int = 0
    interface: str = ""
    backlog: int = 50
    context_factory: Any = None
    fd: int | None = None


@implementer(IListeningPort)
class _NotListening:
    """What the recorder hands back to the endpoint: nothing is listening yet."""

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        pass

    def getHost(self) -> Any:
        return None


class _Recorder:
    """Takes the reactor's place while an endpoint description is parsed and listened on,
    and records the call instead of making it: Twisted's own parser stays the one reading
    descriptions (options, certificate files) without any private API."""

    def __init__(self) -> None:
        self.requests: list[ListenRequest] = []

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> _NotListening:
        self.requests.append(ListenRequest("tcp", port, interface, backlog))
        return _NotListening()

    def listenSSL(
        self,
        port: int,
        factory: Any,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> _NotListening:
        self.requests.append(ListenRequest("ssl", port, interface, backlog, contextFactory))
        return _NotListening()

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: Any) -> Any:
        # The endpoint closes the inherited descriptor right after this call.
        self.requests.append(ListenRequest("adopted", fd=os.dup(fileDescriptor)))
        return _NotListening()


def listen_request(description: str) -> ListenRequest:
    recorder = _Recorder()
    failures: list[Failure] = []
    endpoint = serverFromString(recorder, description)
    try:
        endpoint.listen(protocol.Factory()).addErrback(failures.append)
    except AttributeError:  # a reactor method the recorder lacks (listenUNIX, ...)
        failures.append(Failure())
    if failures:
        if failures[0].check(AttributeError):
            raise ValueError(
                f"{description!r}: with --workers above 1, use tcp:, ssl: or systemd: listeners"
            )
        failures[0].raiseException()
    return recorder.requests[0]


def bind(request: ListenRequest) -> socket.socket:
    """A listening socket for *request*, bound as Twisted's ``listenTCP`` would bind it."""
    if request.kind == "adopted":
        assert request.fd is not None
        return socket.socket(fileno=request.fd)
    family = socket.AF_INET6 if ":" in request.interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((request.interface, request.port))
        sock.listen(request.backlog)
    except OSError as error:
        sock.close()
        raise CannotListenError(request.interface, request.port, error) from None
    return sock


def ignore_repeated_stop_signals() -> None:
    """Let only the first SIGTERM or SIGINT reach the reactor's handler (once it runs).

    A service manager that signals the whole process group (systemd's default
    KillMode=control-group, Ctrl-C in a terminal) reaches each worker twice: directly and
    through the supervisor. A second stop would make the reactor log ReactorNotRunning
    and exit by the signal even after a clean drain.
    """
    stopping = False

    def wrap(previous: Callable[[int, Any], Any]) -> Callable[[int, Any], None]:
        def handler(signum: int, frame: Any) -> None:
            nonlocal stopping
            if not stopping:
                stopping = True
                previous(signum, frame)

        return handler

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if callable(previous):
            signal.signal(signum, wrap(previous))


# -- the worker's side ---------------------------------------------------------------------------


@attrs.frozen
class Inherited:
    """A listening socket a worker inherited: its kind (``tcp``, ``ssl``, ``adopted``) and
    its descriptor number in the worker."""

    kind: str
    fd: int


@attrs.frozen
class WorkerSpec:
    """What the supervisor tells a worker (``--as-worker``): its number, the supervisor's
    pid, and the inherited listeners in the order of ``--port`` then ``--metrics-port``."""

    number: int
    supervisor: int
    listeners: tuple[Inherited, ...]

    def argument(self) -> str:
        fds = ",".join(f"{one.kind}={one.fd}" for one in self.listeners)
        return f"{self.number}:{self.supervisor}:{fds}"

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        try:
            number, supervisor, fds = text.split(":")
            listeners = tuple(
                Inherited(kind, int(fd))
                for kind, fd in (item.split("=") for item in fds.split(",") if item)
            )
            return cls(int(number), int(supervisor), listeners)
        except ValueError:
            raise ValueError("set only by the --workers supervisor") from None


class ListenerEndpoints:
    """Listening endpoints: parsed from the description in a single process; in a worker,
    the supervisor's sockets, taken in the order the daemon asks for them."""

    def __init__(
        self,
        reactor: Any,
        worker: WorkerSpec | None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.reactor = reactor
        self.worker = worker
        self.environ = environ
        self._taken = 0

    def endpoint(self, option: str, description: str) -> IStreamServerEndpoint:
        if self.worker is None:
            parsed = parse_endpoint(self.reactor, option, description, self.environ)
            files = served_files(description)
            if files is None:
                return parsed
            # The standard library's TLS over the TCP port Twisted's parser read.
            request = listen_request(description)
            tcp = TCP4ServerEndpoint(
                self.reactor, request.port, request.backlog, request.interface
            )
            return TLSOver(tcp, stdlib_tls(_server_context(option, description, files)))
        inherited = self.worker.listeners[self._taken]
        self._taken += 1
        with socket.socket(fileno=os.dup(inherited.fd)) as probe:
            family = probe.family
        adopted: IStreamServerEndpoint = AdoptedStreamServerEndpoint(
            self.reactor, inherited.fd, family
        )
        if inherited.kind == "ssl":
            files = served_files(description)
            wrap: Callable[[IProtocolFactory], IProtocolFactory]
            if files is None:  # options only Twisted's TLS has: as reactor.listenSSL does
                context_factory = listen_request(description).context_factory
                wrap = functools.partial(TLSMemoryBIOFactory, context_factory, False)
            else:
                wrap = stdlib_tls(_server_context(option, description, files))
            adopted = TLSOver(adopted, wrap)
        return adopted


def _server_context(option: str, description: str, files: CertificateFiles) -> ssl.SSLContext:
    try:
        return server_context(files)
    except (OSError, ssl.SSLError) as error:
        raise StartupError(f"{option} {description}: {error}") from None


class WorkerRole(Service):
    """A worker's duties beyond serving: stop when the supervisor is gone (its sockets must
    not outlive it), and take SIGHUP (forwarded by the supervisor) without dying of it."""

    log = Logger()

    def __init__(
        self, spec: WorkerSpec, reactor: Any, *, signals: bool = True, hangup: bool = True
    ) -> None:
        self.spec = spec
        self.reactor = reactor
        self.signals = signals
        # False when something else (the routes reloader) owns SIGHUP.
        self.hangup = hangup

    def attach(self, parent: MultiService) -> None:
        self.setServiceParent(parent)
        watch = TimerService(PARENT_CHECK_INTERVAL, self._check_parent)
        watch.clock = self.reactor
        watch.setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        if self.signals and self.hangup:
            signal.signal(signal.SIGHUP, self._on_hangup)
        self.reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        if self.signals:
            ignore_repeated_stop_signals()
            # Held since the supervisor started us; any that came meanwhile arrive now.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        self.log.info(
            "worker {worker} (pid {pid}) serving", worker=self.spec.number, pid=os.getpid()
        )

    def _on_hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(
            self.log.info, "worker {worker}: SIGHUP, nothing to reload", worker=self.spec.number
        )

    def _check_parent(self) -> None:
        if os.getppid() != self.spec.supervisor and self.reactor.running:
            self.log.warn(
                "worker {worker}: the supervisor is gone; stopping", worker=self.spec.number
            )
            self.reactor.stop()


# -- the supervisor ------------------------------------------------------------------------------


@attrs.define
class _Worker:
    number: int
    pid: int
    started: float
    transport: Any


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, ended: Callable[[Failure], None]) -> None:
        self.ended = ended

    def processEnded(self, reason: Failure) -> None:
        self.ended(reason)


def _exit_description(reason: Failure) -> tuple[bool, str]:
    """(clean, text) for a worker's end: clean is exit status 0."""
    code = getattr(reason.value, "exitCode", None)
    sig = getattr(reason.value, "signal", None)
    if sig is not None:
        return False, f"was killed by signal {sig}"
    return code == 0, f"exited with status {code}"


class Supervisor(Service):
    """Binds the listeners, runs the workers, restarts them, forwards SIGTERM and SIGHUP."""

    log = Logger()

    def __init__(
        self,
        *,
        count: int,
        listen: Sequence[str],
        argv: Sequence[str],
        environ: Mapping[str, str],
        grace: float,
        reactor: Any,
        executable: str = sys.executable,
        signals: bool = True,
    ) -> None:
        self.count = count
        self.listen = tuple(listen)
        self.argv = tuple(argv)
        self.environ = dict(environ)
        self.grace = grace
        self.reactor = reactor
        self.executable = executable
        self.signals = signals
        self.metrics_dir: str | None = None
        self.workers: dict[int, _Worker] = {}
        self._sockets: list[socket.socket] = []
        self._kinds: list[str] = []
        self._failures: dict[int, int] = {}
        self._restarts: dict[int, Any] = {}
        self._stopping = False
        self._unclean = 0
        self._all_ended: Deferred[None] | None = None
        self._previous_hangup: Any = None

    def startService(self) -> None:
        super().startService()
        requests = [listen_request(description) for description in self.listen]
        self._sockets = [bind(request) for request in requests]
        self._kinds = [request.kind for request in requests]
        self.metrics_dir = tempfile.mkdtemp(prefix="regproxy-metrics-")
        if self.signals:
            self._previous_hangup = signal.signal(signal.SIGHUP, self._on_hangup)
            self.reactor.callWhenRunning(ignore_repeated_stop_signals)
        self.log.info(
            "supervisor: {count} workers on {listeners}",
            count=self.count,
            listeners=", ".join(self.listen),
        )
        self.reactor.callWhenRunning(self._spawn_all)

    def _spawn_all(self) -> None:
        for number in range(1, self.count + 1):
            if not self._stopping:
                self._spawn(number)

    def _spawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        spec = WorkerSpec(
            number,
            os.getpid(),
            tuple(
                Inherited(kind, FIRST_CHILD_FD + index) for index, kind in enumerate(self._kinds)
            ),
        )
        fds: dict[int, int | str] = {0: 0, 1: 1, 2: 2}
        for index, sock in enumerate(self._sockets):
            fds[FIRST_CHILD_FD + index] = sock.fileno()
        env = {k: v for k, v in self.environ.items() if k not in SYSTEMD_VARIABLES}
        assert self.metrics_dir is not None
        env[METRICS_DIR_VARIABLE] = self.metrics_dir
        args = [self.executable, "-m", "twisted", *self.argv, "--as-worker", spec.argument()]
        holder: list[_Worker] = []
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        try:
            transport = self.reactor.spawnProcess(
                _WorkerProtocol(lambda reason: self._ended(holder[0], reason)),
                self.executable,
                args=args,
                env=env,
                childFDs=fds,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        worker = _Worker(number, transport.pid, self.reactor.seconds(), transport)
        holder.append(worker)
        self.workers[number] = worker
        self.log.info("worker {worker} started (pid {pid})", worker=number, pid=worker.pid)

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        if self.metrics_dir is not None:
            # Its counters stay in the sums; its live gauges (in-flight requests) go.
            multiprocess.mark_process_dead(worker.pid, self.metrics_dir)
        clean, how = _exit_description(reason)
        if self._stopping:
            if not clean:
                self._unclean += 1
                self.log.warn(
                    "worker {worker} (pid {pid}) {how} while stopping",
                    worker=worker.number,
                    pid=worker.pid,
                    how=how,
                )
            if not self.workers and self._all_ended is not None:
                self._all_ended.callback(None)
            return
        lived = self.reactor.seconds() - worker.started
        failures = 0 if lived >= STABLE_AFTER else self._failures.get(worker.number, 0)
        self._failures[worker.number] = failures + 1
        delay = min(MAX_DELAY, FIRST_DELAY * 2**failures)
        self.log.warn(
            "worker {worker} (pid {pid}) {how} after {lived:.1f} s; restarting it in "
            "{delay:.1f} s",
            worker=worker.number,
            pid=worker.pid,
            how=how,
            lived=lived,
            delay=delay,
        )
        self._restarts[worker.number] = self.reactor.callLater(delay, self._spawn, worker.number)

    def _on_hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.forward, signal.SIGHUP)

    def forward(self, signum: int) -> None:
        name = signal.Signals(signum).name
        self.log.info(
            "supervisor: forwarding {signal} to {count} workers",
            signal=name,
            count=len(self.workers),
        )
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(name.removeprefix("SIG"))
            except Exception:  # gone between the look-up and the signal
                self.log.failure("signalling worker {worker}", worker=worker.number)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        # Our copies of the listening sockets go now; each closes for good when the last
        # worker has stopped listening, so clients are refused instead of left waiting.
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        if self.signals and self._previous_hangup is not None:
            signal.signal(signal.SIGHUP, self._previous_hangup)
        ended: Deferred[None] = Deferred()
        self._all_ended = ended
        if self.workers:
            self.forward(signal.SIGTERM)
            killer = self.reactor.callLater(self.grace + KILL_MARGIN, self._kill_rest)
            ended.addBoth(lambda result: (killer.active() and killer.cancel(), result)[1])
        else:
            ended.callback(None)
        ended.addCallback(lambda _: self._finish())
        return ended

    def _kill_rest(self) -> None:
        for worker in list(self.workers.values()):
            self.log.warn(
                "worker {worker} (pid {pid}) still running after the grace; killing it",
                worker=worker.number,
                pid=worker.pid,
            )
            try:
                worker.transport.signalProcess("KILL")
            except Exception:
                self.log.failure("killing worker {worker}", worker=worker.number)

    def _finish(self) -> None:
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None
        if self._unclean:
            self.log.warn("supervisor: {count} workers did not stop cleanly", count=self._unclean)
            return
        self.log.info("supervisor: every worker drained and exited")


def build_supervisor(
    *,
    count: int,
    listen: Sequence[str],
    argv: Sequence[str],
    environ: Mapping[str, str],
    grace: float,
    reactor: Any,
) -> IService:
    top = MultiService()
    # A drained stop exits 0 (see regproxy.signals), without twist's private exit signal.
    StopCleanlyOnSigterm(reactor).setServiceParent(top)
    Supervisor(
        count=count, listen=listen, argv=argv, environ=environ, grace=grace, reactor=reactor
    ).setServiceParent(top)
    return top
