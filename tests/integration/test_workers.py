"""``--workers N`` with real parts: skopeo pulls, killed workers, drains across workers,
summed metrics, and every listener kind (tcp:, ssl:, systemd:)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.support.curl import curl
from tests.support.images import build_image, push, skopeo_copy
from tests.support.metrics import ACCEPT, metric
from tests.support.ports import free_port, wait_for_port
from tests.support.proxy import RegproxyProcess
from tests.support.registry import RegistryServer
from tests.support.seed import SeededRegistry
from tests.support.tls import TLSFiles
from tests.support.tools import systemd_socket_activate
from tests.support.waiting import eventually

REPO_ROOT = Path(__file__).resolve().parents[2]
# Workers start (and restart) as whole Python processes: slow on a loaded machine.
STARTED_WITHIN = 20.0


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def serving(url: str) -> bool:
    with contextlib.suppress(AssertionError):
        return curl(url + "/healthz", timeout=2).status == 200
    return False


def start_workers(
    start_proxy: Callable[..., RegproxyProcess], args: list[str], count: int = 2
) -> RegproxyProcess:
    """The proxy with ``--workers count``, once every worker runs and answers."""
    proxy = start_proxy([*args, "--workers", str(count)])
    eventually(
        lambda: len(children(proxy.pid)) == count, timeout=STARTED_WITHIN, what=f"{count} workers"
    )
    eventually(
        lambda: sum(" serving" in message for message in proxy.log_messages()) == count,
        timeout=STARTED_WITHIN,
        what=f"{count} workers serving",
    )
    eventually(lambda: serving(proxy.url), timeout=STARTED_WITHIN, what="an answer from a worker")
    return proxy


def access_events(proxy: RegproxyProcess) -> list[dict[str, object]]:
    return [e for e in proxy.log_events() if e.get("log_namespace") == "regproxy.access"]


def socket_owner(server_port: int, client: socket.socket, pids: list[int]) -> int | None:
    """Which of *pids* holds the server side of *client*'s loopback connection."""
    client_port = client.getsockname()[1]
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
    return None


def test_skopeo_pulls_through_two_workers(
    start_proxy, prefixed_registry: SeededRegistry, tmp: Path
) -> None:
    proxy = start_workers(
        start_proxy, ["--upstream", prefixed_registry.url, "--repo-prefix", "proj"]
    )
    for number in range(3):
        result = skopeo_copy(f"docker://{proxy.host_port}/app:v1", tmp / f"out{number}")
        assert result.digest == prefixed_registry["app:v1"]
    events = access_events(proxy)
    assert events and all(event["worker"] in (1, 2) for event in events)


def test_metrics_sum_over_workers(start_proxy, prefixed_registry: SeededRegistry) -> None:
    metrics_port = free_port()
    proxy = start_workers(
        start_proxy,
        [
            "--upstream",
            prefixed_registry.url,
            "--repo-prefix",
            "proj",
            "--metrics-port",
            f"tcp:{metrics_port}:interface=127.0.0.1",
        ],
    )
    sent = 0

    def both_workers_answered() -> bool:
        nonlocal sent
        curl(proxy.url + "/v2/app/manifests/v1", "-H", ACCEPT)  # a new connection each time
        sent += 1
        return {e.get("worker") for e in access_events(proxy)} >= {1, 2}

    eventually(
        both_workers_answered,
        timeout=STARTED_WITHIN,
        what="manifest GETs answered by both workers",
    )
    # The metrics listener is the workers' too, and every worker answers with the sum.
    assert curl(proxy.url + "/metrics").status == 404
    for _ in range(4):
        text = curl(f"http://127.0.0.1:{metrics_port}/metrics").body.decode()
        labels = {"route": "default", "endpoint": "manifest", "method": "GET", "status": "200"}
        assert metric(text, "regproxy_requests_total", **labels) == sent
        assert metric(text, "regproxy_in_flight_requests") == 1  # this very request
        assert metric(text, "regproxy_upstream_up", route="default") == 1


def test_killed_worker_is_restarted_and_pulls_after_it_succeed(
    start_proxy, prefixed_registry: SeededRegistry, tmp: Path
) -> None:
    proxy = start_workers(
        start_proxy, ["--upstream", prefixed_registry.url, "--repo-prefix", "proj"]
    )
    assert skopeo_copy(f"docker://{proxy.host_port}/app:v1", tmp / "before").ok
    before = metric(
        curl(proxy.url + "/metrics").body.decode(),
        "regproxy_requests_total",
        route="default",
        endpoint="blob",
        method="GET",
        status="200",
    )
    victim, survivor = children(proxy.pid)
    os.kill(victim, signal.SIGKILL)
    replaced = eventually(
        lambda: (lambda now: len(now) == 2 and victim not in now and now)(children(proxy.pid)),
        timeout=STARTED_WITHIN,
        what="a replacement worker",
    )
    assert survivor in replaced
    assert any("restarting it in" in message for message in proxy.log_messages())
    eventually(
        lambda: serving(proxy.url), timeout=STARTED_WITHIN, what="an answer after the restart"
    )
    for number in range(3):
        result = skopeo_copy(f"docker://{proxy.host_port}/app:v1", tmp / f"after{number}")
        assert result.digest == prefixed_registry["app:v1"]
    after = metric(
        curl(proxy.url + "/metrics").body.decode(),
        "regproxy_requests_total",
        route="default",
        endpoint="blob",
        method="GET",
        status="200",
    )
    # The dead worker's counts stay in the sum: counters never go back.
    assert before == 4 and after == before + 3 * 4


def _connect_to_each(port: int, workers: list[int]) -> list[socket.socket]:
    """One connection held by each worker. The workers share one listening socket and the
    kernel does not spread a burst between them: connections are opened one by one, and
    one that lands on a worker already holding one is closed before it asks anything."""
    held: dict[int, socket.socket] = {}
    for _ in range(200):
        if len(held) == len(workers):
            break
        client = socket.create_connection(("127.0.0.1", port))
        owner = eventually(lambda c=client: socket_owner(port, c, workers), timeout=10)
        if owner in held:
            client.close()
        else:
            held[owner] = client
    assert len(held) == len(workers), "connections did not reach every worker"
    return list(held.values())


def _download(client: socket.socket, path: str) -> tuple[socket.socket, bytearray]:
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += client.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head
    return client, bytearray(head.partition(b"\r\n\r\n")[2])


def test_sigterm_finishes_transfers_on_every_worker_and_exits_0(
    start_proxy, registry: RegistryServer, tmp: Path
) -> None:
    image = build_image(tmp / "layout", layers=(16 * 1024 * 1024,), tag="t", compress=False)
    push(tmp / "layout", "t", f"{registry.host_port}/drainw:v1")
    layer = image.layers[0]
    proxy = start_workers(start_proxy, ["--upstream", registry.url, "--shutdown-grace", "30"])
    workers = children(proxy.pid)
    downloads: list[tuple[socket.socket, bytearray]] = []
    try:
        for client in _connect_to_each(proxy.port, workers):
            downloads.append(_download(client, f"/v2/drainw/blobs/{layer.digest}"))
        keepalive = socket.create_connection(("127.0.0.1", proxy.port))
        keepalive.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert keepalive.recv(65536).startswith(b"HTTP/1.1 200")
        proxy.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
            except OSError:
                return True
            return False

        eventually(refused, timeout=10, what="new connections refused")
        keepalive.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert keepalive.recv(65536).startswith(b"HTTP/1.1 503")
        keepalive.close()
        for client, body in downloads:
            while len(body) < layer.size:
                chunk = client.recv(1024 * 1024)
                if not chunk:
                    break
                body += chunk
            assert "sha256:" + hashlib.sha256(body).hexdigest() == layer.digest
    finally:
        for client, _ in downloads:
            client.close()
    assert proxy.wait(30) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert any("every worker drained" in message for message in proxy.log_messages())


def test_ssl_listener_with_workers(
    start_proxy, prefixed_registry: SeededRegistry, tls_files: TLSFiles, tmp: Path
) -> None:
    port = free_port()
    listener = (
        f"ssl:{port}:privateKey={tls_files.key}:certKey={tls_files.cert}:interface=127.0.0.1"
    )
    proxy = start_workers(
        start_proxy,
        ["--upstream", prefixed_registry.url, "--repo-prefix", "proj", "--port", listener],
    )
    wait_for_port("127.0.0.1", port)
    for number in range(2):
        result = skopeo_copy(
            f"docker://127.0.0.1:{port}/app:v1",
            tmp / f"out{number}",
            tls_verify=True,
            cert_dir=tls_files.cert_dir,
        )
        assert result.digest == prefixed_registry["app:v1"]
    answer = curl(f"https://127.0.0.1:{port}/healthz", "--cacert", str(tls_files.ca_cert))
    assert answer.status == 200
    # The plain listener beside it stays plain.
    assert curl(proxy.url + "/healthz").status == 200
    events = access_events(proxy)
    assert {e["worker"] for e in events} <= {1, 2}


def test_systemd_socket_activation_with_workers(
    tmp: Path, prefixed_registry: SeededRegistry
) -> None:
    port = free_port()
    command = [
        systemd_socket_activate(),
        "-l",
        f"127.0.0.1:{port}",
        "--fdname=regproxy",
        sys.executable,
        "-m",
        "twisted",
        "regproxy",
        "--port",
        "systemd:domain=INET:index=0",
        "--upstream",
        prefixed_registry.url,
        "--repo-prefix",
        "proj",
        "--workers",
        "2",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    log = (tmp / "activate.log").open("wb")
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
    )
    try:
        wait_for_port("127.0.0.1", port)
        # systemd-socket-activate execs the command: its pid is the supervisor's.
        eventually(
            lambda: len(children(process.pid)) == 2, timeout=STARTED_WITHIN, what="2 workers"
        )
        log_path = tmp / "activate.log"
        eventually(
            lambda: len(re.findall(r"worker \d+ \(pid \d+\) serving", log_path.read_text())) == 2,
            timeout=STARTED_WITHIN,
            what="2 workers serving",
        )
        for _ in range(4):
            answer = curl(f"http://127.0.0.1:{port}/v2/app/manifests/v1", "-I", "-H", ACCEPT)
            assert answer.status == 200
            assert answer.header("Docker-Content-Digest") == prefixed_registry["app:v1"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in children(process.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        log.close()


def test_sigterm_to_the_whole_process_group_is_one_clean_stop(
    start_proxy, prefixed_registry: SeededRegistry
) -> None:
    """systemd's default KillMode and Ctrl-C signal every process: workers hear it twice."""
    proxy = start_workers(start_proxy, ["--upstream", prefixed_registry.url])
    os.killpg(proxy.pid, signal.SIGTERM)  # the proxy runs in a session of its own
    assert proxy.wait(30) == 0
    assert "ReactorNotRunning" not in proxy.log_text()
    assert any("every worker drained" in message for message in proxy.log_messages())


def test_sigterm_while_workers_start_is_a_clean_stop(
    start_proxy, prefixed_registry: SeededRegistry
) -> None:
    """Workers still importing hold the signal until they can drain, instead of dying."""
    proxy = start_proxy(["--upstream", prefixed_registry.url, "--workers", "2"])
    eventually(lambda: len(children(proxy.pid)) == 2, timeout=STARTED_WITHIN, what="2 workers")
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(30) == 0
    assert any("every worker drained" in message for message in proxy.log_messages())


def test_sighup_reaches_every_worker_and_stops_none(
    start_proxy, prefixed_registry: SeededRegistry
) -> None:
    proxy = start_workers(start_proxy, ["--upstream", prefixed_registry.url])
    workers = children(proxy.pid)
    proxy.send_signal(signal.SIGHUP)
    eventually(
        lambda: sum("SIGHUP, nothing to reload" in m for m in proxy.log_messages()) == 2,
        timeout=STARTED_WITHIN,
        what="both workers taking SIGHUP",
    )
    assert children(proxy.pid) == workers and proxy.running
    assert serving(proxy.url)


def test_start_up_is_reported_once_and_each_worker_by_its_pid(
    start_proxy, prefixed_registry: SeededRegistry
) -> None:
    metrics_port = free_port()
    proxy = start_workers(
        start_proxy,
        [
            "--upstream",
            prefixed_registry.url,
            "--metrics-port",
            f"tcp:{metrics_port}:interface=127.0.0.1",
        ],
    )
    workers = sorted(children(proxy.pid))
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(30) == 0
    messages = proxy.log_messages()
    assert sum(") starting" in m and m.startswith("regproxy ") for m in messages) == 1
    assert sum(m.startswith("route default: ") for m in messages) == 1
    assert [m for m in messages if m.startswith("listening on ")] == [
        f"listening on 127.0.0.1:{proxy.port} (registry API; --port "
        f"tcp:{proxy.port}:interface=127.0.0.1)",
        f"listening on 127.0.0.1:{metrics_port} (metrics; --metrics-port "
        f"tcp:{metrics_port}:interface=127.0.0.1)",
    ]
    started = sorted(
        int(match[1])
        for m in messages
        if (match := re.fullmatch(r"worker \d started \(pid (\d+)\)", m))
    )
    announced = sorted(
        int(match[1])
        for m in messages
        if (match := re.fullmatch(r"worker \d \(pid (\d+)\) serving", m))
    )
    assert started == announced == workers
    # Twisted's own lines about the same ports say nothing regproxy's did not.
    assert not [m for m in messages if " starting on " in m or re.search(r"Port \d+ Closed", m)]
