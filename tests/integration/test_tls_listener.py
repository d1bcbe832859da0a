"""``ssl:`` listeners on the standard library's TLS (regproxy.server.listen_tls), one process.

Real clients over HTTPS to regproxy in front of a real registry: skopeo pulls with
digest checks, a reader that pauses in the middle of a blob, the scheme the proxy
derives for its own URLs, plain HTTP sent to the TLS port, and a key that does not
match its certificate refused at start.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import http.client
import socket
import ssl
import termios
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.curl import curl
from tests.support.images import skopeo_copy
from tests.support.ports import free_port, wait_for_port
from tests.support.proxy import ProxyStartError
from tests.support.seed import SeededRegistry
from tests.support.tls import TLSFiles, make_ca_and_cert
from tests.support.waiting import eventually


def _listener(port: int, files: TLSFiles) -> str:
    return f"ssl:{port}:privateKey={files.key}:certKey={files.cert}:interface=127.0.0.1"


def _serve(start_proxy, registry: SeededRegistry, files: TLSFiles, *extra: str) -> int:  # type: ignore[no-untyped-def]
    port = free_port()
    args = ["--upstream", registry.url, "--repo-prefix", "proj", "--port", _listener(port, files)]
    start_proxy([*args, *extra])
    wait_for_port("127.0.0.1", port)
    return port


def test_skopeo_pulls_through_the_tls_listener(
    start_proxy, prefixed_registry: SeededRegistry, tls_files: TLSFiles, tmp: Path
) -> None:
    port = _serve(start_proxy, prefixed_registry, tls_files)
    for ref in ("app:v1", "big:v1", "team/app:v1"):
        result = skopeo_copy(
            f"docker://127.0.0.1:{port}/{ref}",
            tmp / ref.replace(":", "-").replace("/", "-"),
            tls_verify=True,
            cert_dir=tls_files.cert_dir,
        )
        assert result.digest == prefixed_registry[ref]


def unread(sock: socket.socket) -> int:
    """Bytes the kernel holds for ``sock`` that the reader has not taken."""
    held = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, held)
    return held[0]


def stalled(sock: socket.socket) -> Callable[[], bool]:
    """A check: true once unread bytes wait on ``sock`` and their count stopped growing
    over three looks (the sender is blocked, not slow)."""
    seen: list[int] = []

    def check() -> bool:
        seen.append(unread(sock))
        return len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3] > 0

    return check


def test_a_reader_that_pauses_mid_blob_gets_every_byte_on_a_kept_connection(
    start_proxy, prefixed_registry: SeededRegistry, tls_files: TLSFiles
) -> None:
    port = _serve(start_proxy, prefixed_registry, tls_files)
    digest = prefixed_registry["big:v1@layer"]
    context = ssl.create_default_context(cafile=str(tls_files.ca_cert))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    connection.connect()
    assert connection.sock is not None
    # A small window, so the 8 MiB blob cannot all wait in the kernel's buffers.
    connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        for _ in range(2):  # the second request goes on the same TLS connection
            connection.request("GET", f"/v2/big/blobs/{digest}")
            response = connection.getresponse()
            assert response.status == 200
            hashed = hashlib.sha256(response.read(64 * 1024))
            # The proxy's writes back up behind a reader that stopped: nothing more arrives.
            eventually(stalled(connection.sock), timeout=20, interval=0.1, what="a full window")
            while chunk := response.read(256 * 1024):
                hashed.update(chunk)
            assert "sha256:" + hashed.hexdigest() == digest
    finally:
        connection.close()


def test_the_proxy_knows_it_is_served_over_https(
    start_proxy, prefixed_token_registry: SeededRegistry, tls_files: TLSFiles
) -> None:
    port = _serve(start_proxy, prefixed_token_registry, tls_files)
    answer = curl(f"https://127.0.0.1:{port}/v2/", "--cacert", str(tls_files.ca_cert))
    assert answer.status == 401
    challenge = answer.header("www-authenticate") or ""
    assert f'realm="https://127.0.0.1:{port}/_token"' in challenge


def test_plain_http_on_the_tls_port_is_dropped_and_the_listener_serves_on(
    start_proxy, prefixed_registry: SeededRegistry, tls_files: TLSFiles
) -> None:
    port = _serve(start_proxy, prefixed_registry, tls_files)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while chunk := raw.recv(4096):
            received += chunk
    assert b"HTTP/1.1" not in received  # at most a TLS alert, never an HTTP answer
    answer = curl(f"https://127.0.0.1:{port}/healthz", "--cacert", str(tls_files.ca_cert))
    assert answer.status == 200


def test_a_key_that_is_not_the_certificates_fails_at_start(
    start_proxy, prefixed_registry: SeededRegistry, tls_files: TLSFiles, tmp: Path
) -> None:
    other = make_ca_and_cert(tmp / "other")
    port = free_port()
    listener = f"ssl:{port}:privateKey={other.key}:certKey={tls_files.cert}:interface=127.0.0.1"
    with pytest.raises(ProxyStartError) as raised:
        start_proxy(["--upstream", prefixed_registry.url, "--port", listener])
    assert "--port" in str(raised.value)


def test_random_bytes_and_cut_handshakes_leave_the_listener_serving(
    start_proxy, prefixed_registry: SeededRegistry, tls_files: TLSFiles
) -> None:
    """What scanners send to a TLS port: noise, a ClientHello cut short, a record header
    announcing more than follows, plain HTTP. Each connection is closed by the proxy, at
    once or when its idle timeout ends the handshake that never completes; none takes it
    down, and real clients are served all along."""
    import random

    port = _serve(start_proxy, prefixed_registry, tls_files, "--idle-timeout", "2")
    generator = random.Random(11)
    shapes = [
        lambda: bytes(generator.getrandbits(8) for _ in range(generator.randint(1, 2048))),
        lambda: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),  # cut ClientHello
        lambda: b"\x16\x03\x03\xff\xff" + bytes(100),  # a record longer than what follows
        lambda: b"\x15\x03\x03\x00\x02\x02\x28",  # an alert before any handshake
        lambda: b"GET / HTTP/1.0\r\n\r\n",
    ]
    sockets = []
    for index in range(60):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.sendall(shapes[index % len(shapes)]())
        sockets.append(raw)
    for raw in sockets[::2]:
        raw.close()  # half of them leave without a word
    context = ssl.create_default_context(cafile=str(tls_files.ca_cert))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    connection.request("GET", "/v2/")
    assert connection.getresponse().status == 200
    connection.close()
    for raw in sockets[1::2]:
        raw.settimeout(10)
        try:
            while raw.recv(4096):  # an alert at most, then the end
                pass
        except ConnectionResetError:
            pass
        raw.close()
