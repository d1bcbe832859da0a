"""The ``--workers`` supervisor in memory: options, listener descriptions, restarts with
back-off, signal forwarding and the drained exit (processes are recorded, never started)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError, ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure

from regproxy.server.cpus import cpus_available, worker_count
from regproxy.server.handoff import FIRST_CHILD_FD, Inherited, WorkerSpec, bind, listen_request
from regproxy.server.supervisor import KILL_MARGIN, METRICS_DIR_VARIABLE, Supervisor
from regproxy.server.upstream_check import PeriodicCheck
from regproxy.server.worker import WorkerRole
from regproxy.tap import Options, makeService
from tests.support.tls import make_ca_and_cert


def options(args: list[str], environ: dict[str, str] | None = None) -> Options:
    parsed = Options(environ=environ or {})
    parsed.parseOptions(args)
    return parsed


def test_workers_default_to_one_and_auto_means_every_cpu() -> None:
    assert options([])["workers"] == 1
    assert options(["--workers", "3"])["workers"] == 3
    assert options(["--workers", "auto"])["workers"] == cpus_available() >= 1
    assert options([], {"REGPROXY_WORKERS": "4"})["workers"] == 4
    assert options(["--workers", "2"], {"REGPROXY_WORKERS": "4"})["workers"] == 2


@pytest.mark.parametrize("value", ["0", "-1", "two", ""])
def test_invalid_worker_counts_name_the_option(value: str) -> None:
    with pytest.raises(usage.UsageError, match="--workers"):
        options(["--workers", value])
    with pytest.raises(ValueError):
        worker_count(value)


def test_worker_spec_survives_the_command_line() -> None:
    spec = WorkerSpec(2, 1234, (Inherited("tcp", 3), Inherited("ssl", 4), Inherited("adopted", 5)))
    assert WorkerSpec.parse(spec.argument()) == spec
    assert options(["--as-worker", spec.argument()])["as-worker"] == spec
    with pytest.raises(usage.UsageError, match="--as-worker"):
        options(["--as-worker", "nonsense"])


def test_one_worker_is_the_plain_daemon_and_more_a_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(METRICS_DIR_VARIABLE, str(tmp_path))  # as the supervisor sets it
    reactor = MemoryReactorClock()
    single = makeService(options([]), reactor=reactor, argv=[])
    assert not any(isinstance(s, Supervisor) for s in single)  # type: ignore[attr-defined]
    assert not any(isinstance(s, WorkerRole) for s in single)  # type: ignore[attr-defined]
    supervised = makeService(options(["--workers", "2"]), reactor=reactor, argv=[])
    # The supervisor, beside the SIGTERM handler that makes a drained stop exit 0.
    (supervisor,) = [s for s in supervised if isinstance(s, Supervisor)]  # type: ignore[attr-defined]
    assert supervisor.count == 2
    with bind(listen_request("tcp:0:interface=127.0.0.1")) as sock:
        worker = makeService(
            options(["--workers", "2", "--as-worker", f"1:99:tcp={sock.fileno()}"]),
            reactor=reactor,
            argv=[],
        )
    assert any(isinstance(s, WorkerRole) for s in worker)  # type: ignore[attr-defined]


def test_one_upstream_check_per_proxy_not_per_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single process checks its upstreams; of N workers only worker 1 does (its gauge is
    shared through the multiprocess metrics), and the supervisor never does."""
    monkeypatch.setenv(METRICS_DIR_VARIABLE, str(tmp_path))
    reactor = MemoryReactorClock()

    def checks(args: list[str]) -> int:
        service = makeService(options(args), reactor=reactor, argv=[])
        return sum(isinstance(one, PeriodicCheck) for one in service)  # type: ignore[attr-defined]

    assert checks([]) == 1
    assert checks(["--workers", "3"]) == 0
    with bind(listen_request("tcp:0:interface=127.0.0.1")) as sock:
        workers = [f"{number}:99:tcp={sock.fileno()}" for number in (1, 2, 3)]
        counts = [checks(["--workers", "3", "--as-worker", worker]) for worker in workers]
    assert counts == [1, 0, 0]


def test_listener_descriptions_are_read_by_twisted_and_bound_by_the_supervisor() -> None:
    request = listen_request("tcp:0:interface=127.0.0.1:backlog=7")
    assert (request.kind, request.port, request.interface, request.backlog) == (
        "tcp",
        0,
        "127.0.0.1",
        7,
    )
    assert listen_request("tcp6:0:interface=\\:\\:1").interface == "::1"
    with bind(request) as sock:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        with pytest.raises(CannotListenError):  # as Twisted's own listenTCP says it
            bind(listen_request(f"tcp:{port}:interface=127.0.0.1"))


def test_ssl_listener_carries_its_context_factory(tmp_path: Path) -> None:
    tls = make_ca_and_cert(tmp_path)
    request = listen_request(f"ssl:0:privateKey={tls.key}:certKey={tls.cert}")
    assert request.kind == "ssl" and request.context_factory is not None
    with pytest.raises(OSError):
        listen_request(f"ssl:0:privateKey={tmp_path}/missing.key")


def test_unsupported_listener_kinds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tcp:, ssl: or systemd:"):
        listen_request(f"unix:{tmp_path}/socket")


# -- the supervisor, with a reactor that records processes -----------------------------------


class Transport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class Reactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[str, str], dict[int, Any], Transport]] = []
        self._exitSignal: int | None = 15

    def spawnProcess(self, protocol: Any, executable: str, **kwargs: Any) -> Transport:
        transport = Transport(1000 + len(self.spawned))
        self.spawned.append(
            (protocol, kwargs["args"], kwargs["env"], kwargs["childFDs"], transport)
        )
        return transport


def end(entry: tuple[Any, ...], reason: Exception) -> None:
    entry[0].processEnded(Failure(reason))


@pytest.fixture
def running(tmp_path: Path) -> tuple[Reactor, Supervisor]:
    reactor = Reactor()
    supervisor = Supervisor(
        count=2,
        listen=["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"],
        argv=["--log-format", "json", "regproxy", "--workers", "2"],
        environ={
            "LISTEN_FDS": "1",
            "LISTEN_PID": "1",
            "KEEP": "me",
            "RUNTIME_DIRECTORY": str(tmp_path),
        },
        grace=5.0,
        reactor=reactor,
        executable="/py",
        signals=False,
    )
    supervisor.startService()
    reactor.run()  # the spawning waits for the reactor
    yield reactor, supervisor
    if supervisor.running:
        supervisor._stopping = True
        for sock in supervisor._sockets:
            sock.close()
        supervisor._remove_runtime()


def test_workers_get_the_listeners_and_one_shared_runtime_directory(
    running, tmp_path: Path
) -> None:
    reactor, supervisor = running
    assert supervisor.runtime_dir and Path(supervisor.runtime_dir).parent == tmp_path
    assert len(reactor.spawned) == 2
    for number, (_, args, env, fds, _) in enumerate(reactor.spawned, start=1):
        assert args[:3] == ["/py", "-m", "twisted"]
        assert args[3:8] == ["--log-format", "json", "regproxy", "--workers", "2"]
        spec = WorkerSpec.parse(args[args.index("--as-worker") + 1])
        assert spec.number == number and spec.supervisor == os.getpid()
        assert spec.runtime_dir == supervisor.runtime_dir  # one for all the workers
        assert [one.fd for one in spec.listeners] == [FIRST_CHILD_FD, FIRST_CHILD_FD + 1]
        assert fds[FIRST_CHILD_FD] == supervisor._sockets[0].fileno()
        assert fds[FIRST_CHILD_FD + 1] == supervisor._sockets[1].fileno()
        assert env[METRICS_DIR_VARIABLE] == os.path.join(supervisor.runtime_dir, "metrics")
        assert "LISTEN_FDS" not in env and "LISTEN_PID" not in env and env["KEEP"] == "me"
    assert supervisor.metrics_dir and os.path.isdir(supervisor.metrics_dir)


def test_dead_workers_are_restarted_with_growing_back_off(running) -> None:
    reactor, supervisor = running
    end(reactor.spawned[0], ProcessTerminated(signal=9))
    assert set(supervisor.workers) == {2}
    reactor.advance(0.4)
    assert len(reactor.spawned) == 2
    reactor.advance(0.1)
    assert len(reactor.spawned) == 3 and set(supervisor.workers) == {1, 2}
    end(reactor.spawned[2], ProcessTerminated(exitCode=1))  # died young again: 1 s
    reactor.advance(0.9)
    assert len(reactor.spawned) == 3
    reactor.advance(0.1)
    assert len(reactor.spawned) == 4
    reactor.advance(60)  # a long life resets the back-off
    end(reactor.spawned[3], ProcessTerminated(exitCode=1))
    reactor.advance(0.5)
    assert len(reactor.spawned) == 5


def test_a_worker_that_exits_0_unasked_is_restarted(running) -> None:
    """Status 0 is a clean stop only when the supervisor asked for one: a worker that ends
    by itself (its reactor stopped on a bug, or it lost its supervisor by mistake) is a
    worker fewer serving, and gets the same restart as one that crashed."""
    reactor, supervisor = running
    end(reactor.spawned[1], ProcessDone(0))
    assert set(supervisor.workers) == {1}
    reactor.advance(0.5)
    assert len(reactor.spawned) == 3 and set(supervisor.workers) == {1, 2}
    spec = WorkerSpec.parse(reactor.spawned[2][1][reactor.spawned[2][1].index("--as-worker") + 1])
    assert spec.number == 2
    end(reactor.spawned[2], ProcessDone(0))  # young again: the back-off grows as for crashes
    reactor.advance(0.9)
    assert len(reactor.spawned) == 3
    reactor.advance(0.1)
    assert len(reactor.spawned) == 4


def test_sigterm_is_forwarded_and_a_drained_stop_exits_0(running) -> None:
    reactor, supervisor = running
    stopped = supervisor.stopService()
    assert [entry[4].signals for entry in reactor.spawned] == [["TERM"], ["TERM"]]
    assert supervisor._sockets == []  # new connections are refused once workers let go
    results: list[object] = []
    stopped.addBoth(results.append)
    end(reactor.spawned[0], ProcessDone(0))
    assert results == []
    runtime_dir = supervisor.runtime_dir
    end(reactor.spawned[1], ProcessDone(0))
    assert results == [None]
    assert runtime_dir and not os.path.exists(runtime_dir)
    reactor.advance(60)
    assert len(reactor.spawned) == 2  # nothing restarted while stopping


def test_workers_past_the_grace_are_killed_and_the_exit_is_a_failure(running) -> None:
    reactor, supervisor = running
    stopped = supervisor.stopService()
    end(reactor.spawned[0], ProcessDone(0))
    reactor.advance(5.0 + KILL_MARGIN)
    assert reactor.spawned[1][4].signals == ["TERM", "KILL"]
    end(reactor.spawned[1], ProcessTerminated(signal=9))
    results: list[object] = []
    stopped.addBoth(results.append)
    assert results == [None]


def test_sighup_goes_to_every_worker(running) -> None:
    reactor, supervisor = running
    import signal

    supervisor.forward(signal.SIGHUP)
    assert [entry[4].signals for entry in reactor.spawned] == [["HUP"], ["HUP"]]


def test_a_worker_stops_when_its_supervisor_is_gone() -> None:
    reactor = MemoryReactorClock()
    role = WorkerRole(WorkerSpec(1, os.getppid(), ()), reactor, signals=False)
    top = MultiService()
    role.attach(top)
    top.startService()
    reactor.running = True  # (MemoryReactor.run() would stop at once)
    reactor.advance(5)
    assert not reactor.hasStopped
    orphan = WorkerRole(WorkerSpec(2, os.getppid() + 1, ()), reactor, signals=False)
    orphan.attach(MultiService())
    orphan.parent.startService()  # type: ignore[union-attr]
    reactor.advance(1)
    assert reactor.hasStopped


def test_supervisor_reports_each_listener_once_for_all_workers(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    supervisor = Supervisor(
        count=2,
        listen=["tcp:0:interface=127.0.0.1"],
        metrics_listen="tcp:0:interface=127.0.0.1",
        argv=["regproxy", "--workers", "2"],
        environ={"RUNTIME_DIRECTORY": str(tmp_path)},
        grace=5.0,
        reactor=Reactor(),
        signals=False,
    )
    supervisor.log = Logger(observer=events.append)
    supervisor.startService()
    try:
        lines = [formatEvent(event) for event in events]
        ports = [sock.getsockname()[1] for sock in supervisor._sockets]
        where = "tcp:0:interface=127.0.0.1"
        assert lines[:2] == [
            f"listening on 127.0.0.1:{ports[0]} (registry API; --port {where})",
            f"listening on 127.0.0.1:{ports[1]} (metrics; --metrics-port {where})",
        ]
    finally:
        supervisor._close_sockets()
        supervisor._remove_runtime()


def test_listener_failures_under_workers_are_one_line_and_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"):
        monkeypatch.delenv(variable, raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        tls = make_ca_and_cert(tmp_path)
        cases = {
            f"tcp:{port}:interface=127.0.0.1": f"Error: --port tcp:{port}:interface=127.0.0.1: "
            "the address is already in use",
            f"ssl:0:privateKey={tmp_path}/missing.key:certKey={tls.cert}": "Error: --port ssl:0:"
            f"privateKey={tmp_path}/missing.key:certKey={tls.cert}: [Errno 2] No such file",
            f"unix:{tmp_path}/socket": f"Error: --port 'unix:{tmp_path}/socket': with --workers"
            " above 1, use tcp:, ssl: or systemd: listeners",
            # As a single process says it (listen.parse_endpoint).
            "systemd:domain=INET:index=0": "Error: --port systemd:domain=INET:index=0: the "
            "supervisor passed no such socket; start regproxy through its .socket unit",
        }
        runtime = tmp_path / "runtime"
        runtime.mkdir()
        for description, expected in cases.items():
            supervisor = Supervisor(
                count=2,
                listen=["tcp:0:interface=127.0.0.1", description],
                argv=["regproxy", "--workers", "2"],
                environ={"RUNTIME_DIRECTORY": str(runtime)},
                grace=5.0,
                reactor=Reactor(),
                signals=False,
            )
            with pytest.raises(SystemExit) as caught:
                supervisor.startService()
            message = str(caught.value.code)
            assert message.startswith(expected) and "\n" not in message, message
            assert supervisor._sockets == [] and list(runtime.iterdir()) == []
