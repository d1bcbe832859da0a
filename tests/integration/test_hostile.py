"""What internet scanners send: every answer is a clear 4xx, nothing reaches the upstream."""

from __future__ import annotations

import json
import socket

import pytest

from tests.support.registry import RegistryServer


def raw(port: int, request: bytes, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; return status, headers and whatever body came before close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        data = b""
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
                if b"\r\n\r\n" in data:
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = [
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ]
                    if length and len(body) >= length[0]:
                        break
        except (TimeoutError, ConnectionResetError):
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def proxy(start_proxy, registry: RegistryServer):
    return start_proxy(["--upstream", registry.url, "--repo-prefix", "proj"])


@pytest.mark.parametrize(
    "target",
    [
        "/v2/../../etc/passwd",
        "/v2/..%2f..%2fetc/passwd/manifests/latest",
        "/v2/%2e%2e/%2e%2e/manifests/latest",
        "/v2/app/manifests/..%2F..%2Fx",
        "/v2/app%00/manifests/latest",
        "/v2/app/blobs/sha256:" + "0" * 63 + "%00",
        "/v2/" + "a/" * 200 + "manifests/latest",
    ],
)
def test_traversal_and_encoding_tricks_are_4xx_json(proxy, target: str) -> None:
    status, headers, body = raw(
        proxy.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert 400 <= status < 500
    assert json.loads(body)["errors"][0]["code"]
    assert headers["docker-distribution-api-version"] == "registry/2.0"


@pytest.mark.parametrize("target", ["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd"])
def test_traversal_outside_the_api_is_not_redirected(proxy, target: str) -> None:
    status, headers, _ = raw(
        proxy.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert status == 404
    assert "location" not in headers


@pytest.mark.parametrize("method", ["TRACE", "OPTIONS", "PROPFIND", "PATCH", "FOO"])
def test_odd_methods_get_405(proxy, method: str) -> None:
    status, headers, body = raw(
        proxy.port, f"{method} /v2/app/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


def test_forward_proxy_shapes_are_refused(proxy) -> None:
    status, _, body = raw(
        proxy.port, b"GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status == 400
    assert json.loads(body)["errors"][0]["code"] == "REQUEST_INVALID"
    status, _, _ = raw(proxy.port, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status in (400, 405)


def test_request_smuggling_shapes_are_refused(proxy) -> None:
    status, _, _ = raw(
        proxy.port,
        b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert status == 400
    status, _, _ = raw(
        proxy.port,
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    )
    assert status == 400


def test_oversized_lines_and_headers_are_refused(proxy) -> None:
    status, _, _ = raw(
        proxy.port, b"GET /v2/" + b"a" * 20000 + b"/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert 400 <= status < 500
    status, _, _ = raw(
        proxy.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n"
    )
    assert 400 <= status < 500
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(600))
    status, _, _ = raw(proxy.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert 400 <= status < 500


def test_oversized_token_form_is_refused_early(proxy) -> None:
    status, _, body = raw(
        proxy.port,
        b"POST /_token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
        b"\r\nContent-Length: 100000000\r\n\r\nscope=",
    )
    assert status == 413
    assert json.loads(body)["errors"][0]["code"] == "REQUEST_INVALID"


def test_garbage_is_not_a_crash(proxy) -> None:
    status, _, _ = raw(proxy.port, b"\x00\xff\xfe garbage\r\n\r\n")
    assert status == 400
    # The daemon still answers afterwards.
    status, _, _ = raw(
        proxy.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 200


def test_no_version_disclosure(proxy) -> None:
    status, headers, _ = raw(
        proxy.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    assert headers["server"] == "regproxy"
