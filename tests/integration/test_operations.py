"""Running regproxy in production: health, metrics, access logs, SIGTERM, socket activation."""

from __future__ import annotations

import hashlib
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support.curl import curl
from tests.support.images import build_image, push, skopeo_copy
from tests.support.metrics import ACCEPT, metric
from tests.support.ports import free_port, wait_for_port
from tests.support.proxy import RegproxyProcess
from tests.support.registry import RegistryServer
from tests.support.seed import SeededRegistry
from tests.support.tools import systemd_socket_activate
from tests.support.waiting import eventually

REPO_ROOT = Path(__file__).resolve().parents[2]
# distribution 2.8 hides OCI manifests from clients that do not accept them.


def test_health_and_readiness_do_not_follow_the_upstream(start_proxy) -> None:
    proxy = start_proxy(["--upstream", f"http://127.0.0.1:{free_port()}"])
    assert curl(proxy.url + "/healthz").status == 200
    assert curl(proxy.url + "/readyz").status == 200
    assert curl(proxy.url + "/v2/app/manifests/v1").status == 502
    metrics = curl(proxy.url + "/metrics").body.decode()
    assert metric(metrics, "regproxy_upstream_up", route="default") == 0
    assert metric(metrics, "regproxy_upstream_errors_total", route="default", kind="connect") == 1


def test_metrics_after_real_pulls(
    start_proxy, prefixed_registry: SeededRegistry, tmp: Path
) -> None:
    proxy = start_proxy(["--upstream", prefixed_registry.url, "--repo-prefix", "proj"])
    skopeo_copy(f"docker://{proxy.host_port}/app:v1", tmp / "out")
    response = curl(proxy.url + "/metrics")
    assert response.status == 200
    assert (response.header("Content-Type") or "").startswith("text/plain")
    text = response.body.decode()
    manifests = metric(
        text,
        "regproxy_requests_total",
        route="default",
        endpoint="manifest",
        method="GET",
        status="200",
    )
    assert manifests is not None and manifests >= 1
    blobs = metric(
        text,
        "regproxy_requests_total",
        route="default",
        endpoint="blob",
        method="GET",
        status="200",
    )
    assert blobs == 4  # three layers and the config
    layer_bytes = sum(layer.size for layer in prefixed_registry.images.app.layers)
    sent = metric(text, "regproxy_response_bytes_total", route="default", endpoint="blob")
    assert sent is not None and sent >= layer_bytes
    assert (
        metric(text, "regproxy_request_duration_seconds_count", route="default", endpoint="blob")
        == 4
    )
    assert (
        metric(text, "regproxy_upstream_latency_seconds_count", route="default", endpoint="blob")
        == 4
    )
    assert metric(text, "regproxy_in_flight_requests") == 1  # this very /metrics request
    assert metric(text, "regproxy_upstream_up", route="default") == 1


def test_metrics_on_their_own_listener(start_proxy, prefixed_registry: SeededRegistry) -> None:
    port = free_port()
    proxy = start_proxy(
        ["--upstream", prefixed_registry.url, "--metrics-port", f"tcp:{port}:interface=127.0.0.1"]
    )
    wait_for_port("127.0.0.1", port)
    assert curl(proxy.url + "/metrics").status == 404
    separate = curl(f"http://127.0.0.1:{port}/metrics")
    assert separate.status == 200
    assert "regproxy_requests_total" in separate.body.decode()


ACCESS_FIELDS = {
    "request_id",
    "client",
    "method",
    "path",
    "status",
    "bytes",
    "duration",
    "upstream_status",
    "route",
}


def test_json_access_log_carries_every_field(
    start_proxy, prefixed_registry: SeededRegistry
) -> None:
    proxy = start_proxy(
        [
            "--upstream",
            prefixed_registry.url,
            "--repo-prefix",
            "proj",
            "--trusted-proxy",
            "127.0.0.0/8",
        ]
    )
    curl(proxy.url + "/v2/app/manifests/v1", "-H", "X-Forwarded-For: 203.0.113.7", "-H", ACCEPT)
    curl(proxy.url + "/v2/Invalid/manifests/v1", "-H", "Authorization: Bearer s3cr3t-t0ken")
    proxy.stop()
    access = [e for e in proxy.log_events() if e.get("log_namespace") == "regproxy.access"]
    assert len(access) == 2
    assert all(set(event) >= ACCESS_FIELDS for event in access)
    ok, bad = access
    assert (ok["client"], ok["status"], ok["upstream_status"]) == ("203.0.113.7", 200, 200)
    assert ok["path"] == "/v2/app/manifests/v1" and ok["bytes"] > 0
    assert (bad["status"], bad["upstream_status"]) == (400, None)
    assert "s3cr3t-t0ken" not in proxy.log_text()


def test_untrusted_peers_cannot_forge_their_address(start_proxy, prefixed_registry) -> None:
    proxy = start_proxy(["--upstream", prefixed_registry.url])
    curl(proxy.url + "/v2/", "-H", "X-Forwarded-For: 203.0.113.7")
    proxy.stop()
    access = [e for e in proxy.log_events() if e.get("log_namespace") == "regproxy.access"]
    assert [event["client"] for event in access] == ["127.0.0.1"]


def test_text_access_log_is_one_line_per_request(
    tmp: Path, prefixed_registry: SeededRegistry
) -> None:
    proxy = RegproxyProcess(
        ["--upstream", prefixed_registry.url, "--repo-prefix", "proj"], directory=tmp / "p"
    )
    proxy.twist_args = ["--log-format", "text"]
    with proxy:
        curl(proxy.url + "/v2/app/manifests/v1", "-H", ACCEPT)
    lines = [line for line in proxy.log_text().splitlines() if "[regproxy.access" in line]
    assert len(lines) == 1
    assert re.search(
        r"127\.0\.0\.1 GET /v2/app/manifests/v1 200 \d+ [\d.]+s upstream=200", lines[0]
    )


def _slow_download(port: int, path: str) -> tuple[socket.socket, bytes]:
    client = socket.create_connection(("127.0.0.1", port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += client.recv(65536)
    return client, head


def test_sigterm_lets_a_running_download_finish(
    start_proxy, registry: RegistryServer, tmp: Path
) -> None:
    image = build_image(tmp / "layout", layers=(32 * 1024 * 1024,), tag="t", compress=False)
    push(tmp / "layout", "t", f"{registry.host_port}/drain:v1")
    layer = image.layers[0]
    proxy = start_proxy(["--upstream", registry.url, "--shutdown-grace", "20"])
    keepalive = socket.create_connection(("127.0.0.1", proxy.port))
    client, head = _slow_download(proxy.port, f"/v2/drain/blobs/{layer.digest}")
    assert head.startswith(b"HTTP/1.1 200")
    body = bytearray(head.partition(b"\r\n\r\n")[2])
    proxy.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
        except OSError:
            return True
        return False

    # New connections are refused while the download goes on.
    eventually(refused, timeout=5)
    # An open keep-alive connection sees the drain.
    keepalive.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert keepalive.recv(65536).startswith(b"HTTP/1.1 503")
    keepalive.close()

    def answered() -> bool:
        return any(f"/v2/drain/blobs/{layer.digest} 200" in line for line in proxy.log_messages())

    while len(body) < layer.size and not answered():
        chunk = client.recv(64 * 1024)
        if not chunk:
            break
        body += chunk
        time.sleep(0.002)  # a client slower than the proxy
    # The proxy has answered: the download's last bytes wait in its buffer (its transport
    # had paused the channel) while this client holds still, and the drain closes the
    # connection meanwhile. The client reads them after a moment, and the process stops
    # as soon as they are sent, not when the grace runs out.
    time.sleep(0.5)
    while len(body) < layer.size:
        chunk = client.recv(1024 * 1024)
        if not chunk:
            break
        body += chunk
    client.close()
    read_all = time.monotonic()
    assert "sha256:" + hashlib.sha256(body).hexdigest() == layer.digest
    assert proxy.wait(15) == 0
    assert time.monotonic() - read_all < 5


def test_systemd_socket_activation(tmp: Path, prefixed_registry: SeededRegistry) -> None:
    port = free_port()
    command = [
        # --fdname: systemd units always name their sockets (LISTEN_FDNAMES), and Twisted
        # only adopts named descriptors.
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
    ]
    log = (tmp / "activate.log").open("wb")
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port)
        answer = curl(f"http://127.0.0.1:{port}/v2/app/manifests/v1", "-I", "-H", ACCEPT)
        assert answer.status == 200
        assert answer.header("Docker-Content-Digest") == prefixed_registry["app:v1"]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
