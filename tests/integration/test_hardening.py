"""Hardening, through a real distribution registry: framing that could smuggle a request,
names too long once prefixed, HEAD lengths that match the GET body, well-formed 416s."""

from __future__ import annotations

import contextlib
import json
import re
import socket

import pytest

from tests.support.curl import curl
from tests.support.seed import SeededRegistry
from tests.support.waiting import eventually


@pytest.fixture
def proxy(start_proxy, prefixed_registry: SeededRegistry):
    return start_proxy(["--upstream", prefixed_registry.url, "--repo-prefix", "proj"])


def exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send ``data`` on one keep-alive connection; everything the proxy sent until it
    closed the connection or went quiet."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        conn.settimeout(1.5)
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return received


def status_lines(received: bytes) -> list[bytes]:
    """Every status line, wherever a body ended and the next answer began."""
    return re.findall(rb"HTTP/1\.1 \d{3}", received)


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_transfer_encoding_identity_cannot_smuggle_a_second_request(
    proxy, prefixed_registry: SeededRegistry, method: bytes
) -> None:
    digest = prefixed_registry["app:v1"]
    received = exchange(
        proxy.port,
        method + b" /v2/app/manifests/" + digest.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: identity\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    # Exactly one answer, a 400, and the connection is closed: the body is never a request.
    assert [line[:12] for line in status_lines(received)] == [b"HTTP/1.1 400"]
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    if method == b"GET":
        assert json.loads(body)["errors"][0]["code"] == "REQUEST_INVALID"
    else:
        assert body == b""


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\n\r\nhello",
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ],
)
def test_reads_with_a_body_are_refused_and_closed(proxy, framing: bytes) -> None:
    received = exchange(
        proxy.port,
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + framing + b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert [line[:12] for line in status_lines(received)] == [b"HTTP/1.1 400"]


def test_a_zero_content_length_on_a_read_is_fine_on_keep_alive(proxy) -> None:
    received = exchange(
        proxy.port,
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert [line[:12] for line in status_lines(received)] == [b"HTTP/1.1 200"] * 2


def test_a_400_to_a_head_has_no_body(proxy) -> None:
    received = exchange(
        proxy.port,
        b"HEAD /v2/UPPER/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"HEAD /v2/app/blobs/sha256:zz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    # Two answers on one connection, neither with a body (the second would be garbled).
    assert [line[:12] for line in status_lines(received)] == [b"HTTP/1.1 400"] * 2
    assert received.endswith(b"\r\n\r\n")


def test_a_name_too_long_once_prefixed_is_400_not_the_upstreams_500(proxy) -> None:
    # (Short components: distribution's filesystem driver fails on long ones by itself.)
    name = "/".join(["a" * 50] * 5)  # 254 characters: valid alone, 259 as proj/<name>
    answer = curl(proxy.url + f"/v2/{name}/manifests/v1")
    assert answer.status == 400
    assert answer.error_codes() == ["NAME_INVALID"]
    # distribution itself counts its own host name into the 255 (name + "host:port/").
    fitting = "/".join(["a" * 50] * 4 + ["a" * 20])  # 229 characters with the prefix
    assert curl(proxy.url + f"/v2/{fitting}/manifests/v1").status == 404


@pytest.mark.parametrize(
    "path", ["/v2/app/manifests/nope", "/v2/app/tags/list", "/v2/nothing-here/tags/list"]
)
def test_head_content_length_is_the_get_body_length(proxy, path: str) -> None:
    get = curl(proxy.url + path)
    head = curl(proxy.url + path, "-I")
    assert head.status == get.status
    length = head.header("Content-Length")
    # Never the upstream's length of a body the proxy rewrites.
    assert length is None or int(length) == len(get.body), (length, len(get.body))
    if get.status == 200:
        assert length is not None


def test_a_range_past_the_end_of_a_small_blob_is_a_clean_416(
    proxy, prefixed_registry: SeededRegistry
) -> None:
    config = prefixed_registry.images.app.config
    url = proxy.url + f"/v2/app/blobs/{config.digest}"
    answer = curl(url, "-H", f"Range: bytes={config.size + 10}-", "--max-time", "10")
    assert answer.status == 416
    assert answer.header("Content-Range") == f"bytes */{config.size}"
    assert json.loads(answer.body)["errors"][0]["code"] == "RANGE_INVALID"
    # The connection stays usable: the next request on a fresh one works too.
    assert curl(url).status == 200


@pytest.mark.parametrize(
    "hosts",
    [
        b"Host: localhost\r\nHost: 127.0.0.1\r\n",
        b"Host: x@localhost\r\n",
        b"Host: a b\r\n",
        b"",  # HTTP/1.1 without a Host
    ],
)
def test_host_must_be_one_and_well_formed(proxy, hosts: bytes) -> None:
    """Host routes choose the upstream by Host: a front proxy reading another Host than
    regproxy must not be possible."""
    received = exchange(
        proxy.port,
        b"GET /v2/app/tags/list HTTP/1.1\r\n" + hosts + b"\r\n"
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert [line[:12] for line in status_lines(received)] == [b"HTTP/1.1 400"]


def test_refusals_leave_a_trace_in_the_access_log(proxy) -> None:
    exchange(
        proxy.port,
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
    )
    eventually(
        lambda: any(e.get("error_kind") == "refused" for e in proxy.log_events()), timeout=5
    )
    [event] = [e for e in proxy.log_events() if e.get("error_kind") == "refused"]
    assert (event["status"], event["method"]) == (400, "GET")


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"GET /v2/ HTTP/1.1\r\nHo"],
    ids=["nothing", "one request then idle", "a request that never ends"],
)
def test_a_silent_client_connection_is_closed_after_the_idle_timeout(
    start_proxy, prefixed_registry: SeededRegistry, sent: bytes
) -> None:
    """Twisted keeps a silent connection 12 hours by default: a scanner's free sockets."""
    import time

    proxy = start_proxy(
        ["--upstream", prefixed_registry.url, "--repo-prefix", "proj", "--idle-timeout", "1"]
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
        started = time.monotonic()
        conn.sendall(sent)
        received = b""
        while chunk := conn.recv(65536):  # until the proxy closes: a timeout raises
            received += chunk
        waited = time.monotonic() - started
    assert 0.8 <= waited < 8
    assert received.count(b"HTTP/1.1 200") == (1 if sent.endswith(b"\r\n\r\n") else 0)


def test_a_download_longer_than_the_idle_timeout_is_not_cut(
    start_proxy, prefixed_registry: SeededRegistry
) -> None:
    """The idle timer stops while a request is answered: a client reading a blob slowly
    for longer than it, but never stalling, gets every byte."""
    import hashlib
    import time

    proxy = start_proxy(
        ["--upstream", prefixed_registry.url, "--repo-prefix", "proj", "--idle-timeout", "1"]
    )
    digest = prefixed_registry["big:v1@layer"]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
        conn.sendall(f"GET /v2/big/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        received = b""
        while b"\r\n\r\n" not in received:
            received += conn.recv(65536)
        head, _, body = received.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
        started = time.monotonic()
        while len(body) < length:
            body += conn.recv(512 * 1024)
            time.sleep(0.1)  # about 5 MB/s: the 8 MiB blob takes longer than 1 s
        assert time.monotonic() - started > 1
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest


def test_a_request_trickling_in_is_refused_with_408_at_its_deadline(
    start_proxy, prefixed_registry: SeededRegistry
) -> None:
    """One byte every 0.3 s never leaves the connection silent for the 1 s idle timeout;
    the request as a whole must still arrive within it."""
    import time

    proxy = start_proxy(
        ["--upstream", prefixed_registry.url, "--repo-prefix", "proj", "--idle-timeout", "1"]
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
        started = time.monotonic()
        received = b""
        try:
            for byte in b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"y" * 30:
                conn.sendall(bytes([byte]))
                time.sleep(0.3)
                conn.setblocking(False)
                try:
                    received += conn.recv(65536)
                except BlockingIOError:
                    pass
                finally:
                    conn.setblocking(True)
                if received:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        conn.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b'"REQUEST_INVALID"' in received
    assert time.monotonic() - started < 6
