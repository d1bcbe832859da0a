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
runtime directory its workers share (``runtime_dir``), where prometheus-client's
multiprocess mode keeps every worker's metrics. It also says, once for all its workers,
where they listen (each worker's start-up is one line naming its pid).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.application.service import IService, MultiService, Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import Config
from .handoff import (
    FIRST_CHILD_FD,
    Inherited,
    ListenRequest,
    UnsharedListener,
    WorkerSpec,
    bind,
    listen_request,
)
from .listen import (
    ALL_INTERFACES_WITH_CREDENTIALS,
    announce,
    endpoint_error,
    explain_listen_failure,
)
from .runtime_dir import RuntimeDirectory
from .signals import HELD_SIGNALS, StopCleanlyOnSigterm, ignore_repeated_stop_signals
from .startup import StartupError, StartupReport, holds_credentials

# The environment variable prometheus-client reads (at import) to switch to multiprocess mode.
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# Variables of systemd socket activation: they describe the supervisor's descriptors.
SYSTEMD_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
# Restart back-off: the first restart after FIRST_DELAY, doubling up to MAX_DELAY while
# workers keep dying young; a worker that ran for STABLE_AFTER seconds resets it.
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
STABLE_AFTER = 30.0
# Beyond the workers' own grace: time for a worker to start, drain and exit.
KILL_MARGIN = 10.0


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
        metrics_listen: str | None = None,
        warn_all_interfaces: str | None = None,
    ) -> None:
        self.count = count
        self.listen = tuple(listen)
        self.metrics_listen = metrics_listen
        self.warn_all_interfaces = warn_all_interfaces
        self.argv = tuple(argv)
        self.environ = dict(environ)
        self.grace = grace
        self.reactor = reactor
        self.executable = executable
        self.signals = signals
        # Made when the service starts; its path is each worker's WorkerSpec.runtime_dir.
        self.runtime: RuntimeDirectory | None = None
        self.workers: dict[int, _Worker] = {}
        self._sockets: list[socket.socket] = []
        self._kinds: list[str] = []
        self._failures: dict[int, int] = {}
        self._restarts: dict[int, Any] = {}
        self._stopping = False
        self._unclean = 0
        self._all_ended: Deferred[None] | None = None
        self._previous_hangup: Any = None

    @property
    def runtime_dir(self) -> str | None:
        """The directory every worker shares (``WorkerSpec.runtime_dir`` in the workers)."""
        return self.runtime.path if self.runtime is not None else None

    @property
    def metrics_dir(self) -> str | None:
        return self.runtime.metrics if self.runtime is not None else None

    def _listeners(self) -> list[tuple[str, str, str]]:
        """(option, description, what it serves) of each listener, in the workers' order."""
        metrics = [] if self.metrics_listen is None else [self.metrics_listen]
        return [
            *(("--port", description, "registry API") for description in self.listen),
            *(("--metrics-port", description, "metrics") for description in metrics),
        ]

    def startService(self) -> None:
        """Make the runtime directory and bind every listener, or end twist with one
        ``Error:`` line (logging has not begun: stderr is the whole story)."""
        super().startService()
        try:
            self.runtime = RuntimeDirectory.make(self.environ, workers=self.count)
            for option, description, _ in self._listeners():
                sock, kind = _bound(option, description, self.environ)
                self._sockets.append(sock)
                self._kinds.append(kind)
        except StartupError as error:
            self._close_sockets()
            self._remove_runtime()
            raise SystemExit(f"Error: {error}") from None
        for sock, (option, description, serves) in zip(
            self._sockets, self._listeners(), strict=True
        ):
            host, where = _address(sock)
            announce(
                self.log,
                host=host,
                where=where,
                serves=serves,
                option=option,
                description=description,
                warn_all_interfaces=self.warn_all_interfaces if serves != "metrics" else None,
            )
        if self.signals:
            self._previous_hangup = signal.signal(signal.SIGHUP, self._on_hangup)
            self.reactor.callWhenRunning(ignore_repeated_stop_signals)
        self.log.info(
            "supervisor: {count} workers on {listeners}",
            count=self.count,
            listeners=", ".join(description for _, description, _ in self._listeners()),
        )
        self.reactor.callWhenRunning(self._spawn_all)

    def _spawn_all(self) -> None:
        for number in range(1, self.count + 1):
            if not self._stopping:
                self._spawn(number)

    def _spawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        assert self.runtime is not None
        spec = WorkerSpec(
            number,
            os.getpid(),
            tuple(
                Inherited(kind, FIRST_CHILD_FD + index) for index, kind in enumerate(self._kinds)
            ),
            self.runtime.path,
        )
        fds: dict[int, int | str] = {0: 0, 1: 1, 2: 2}
        for index, sock in enumerate(self._sockets):
            fds[FIRST_CHILD_FD + index] = sock.fileno()
        env = {k: v for k, v in self.environ.items() if k not in SYSTEMD_VARIABLES}
        env[METRICS_DIR_VARIABLE] = self.runtime.metrics
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
            # Imported here: the supervisor serves no metrics, and needs prometheus-client
            # only for this clean-up, once a worker has died.
            from prometheus_client import multiprocess

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
        self._close_sockets()
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

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    def _remove_runtime(self) -> None:
        if self.runtime is not None:
            self.runtime.remove()
            self.runtime = None

    def _finish(self) -> None:
        self._remove_runtime()
        if self._unclean:
            self.log.warn("supervisor: {count} workers did not stop cleanly", count=self._unclean)
            return
        self.log.info("supervisor: every worker drained and exited")


def _bound(option: str, description: str, environ: Mapping[str, str]) -> tuple[socket.socket, str]:
    """The listening socket for ``description`` and its kind, or a StartupError that
    names the option (a port in use, a TLS key that cannot be read, a kind workers cannot
    share), as a single process says it."""
    try:
        request: ListenRequest = listen_request(description)
    except UnsharedListener as error:
        raise StartupError(f"{option} {error}") from None
    except Exception as error:  # Twisted's parser: a key file, a bad option, ...
        raise endpoint_error(option, description, error, environ) from None
    try:
        return bind(request), request.kind
    except (CannotListenError, OSError) as error:
        raise StartupError(f"{option} {description}: {explain_listen_failure(error)}") from None


def _address(sock: socket.socket) -> tuple[str | None, str]:
    """(host, "host:port") of a bound socket, as a Listener reports its own."""
    name = sock.getsockname()
    if isinstance(name, tuple):
        return str(name[0]), f"{name[0]}:{name[1]}"
    return None, str(name)  # a UNIX socket systemd handed over


def build_supervisor(
    *,
    config: Config,
    count: int,
    argv: Sequence[str],
    environ: Mapping[str, str],
    reactor: Any,
    warnings: Sequence[str] = (),
) -> IService:
    """The ``--workers`` supervisor, its start-up report (version, routes, warnings and
    the listeners it binds) said once for all its workers."""
    top = MultiService()
    # First, so that its lines come before the listeners'.
    StartupReport(config, warnings=warnings).setServiceParent(top)
    # A drained stop exits 0 (see regproxy.server.signals), without twist's private exit signal.
    StopCleanlyOnSigterm(reactor).setServiceParent(top)
    Supervisor(
        count=count,
        listen=config.listen,
        metrics_listen=config.metrics_listen,
        argv=argv,
        environ=environ,
        grace=config.shutdown_grace,
        reactor=reactor,
        warn_all_interfaces=(
            ALL_INTERFACES_WITH_CREDENTIALS if holds_credentials(config) else None
        ),
    ).setServiceParent(top)
    return top
