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

import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.application.service import IService, MultiService, Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .handoff import FIRST_CHILD_FD, Inherited, WorkerSpec, bind, listen_request
from .signals import HELD_SIGNALS, StopCleanlyOnSigterm, ignore_repeated_stop_signals

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
    # A drained stop exits 0 (see regproxy.server.signals), without twist's private exit signal.
    StopCleanlyOnSigterm(reactor).setServiceParent(top)
    Supervisor(
        count=count, listen=listen, argv=argv, environ=environ, grace=grace, reactor=reactor
    ).setServiceParent(top)
    return top
