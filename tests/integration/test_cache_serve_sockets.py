"""Serving stored objects over real sockets: sendfile, ranges, HEAD, slow and departing
clients, TLS (a server process of its own, fetched with curl and raw sockets)."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import time
from pathlib import Path

import pytest

from regproxy.cache.store import open_store
from tests.support.curl import curl
from tests.support.tls import make_ca_and_cert
from tests.support.waiting import eventually
from tests.unit.cache.cache_helpers import digest_of

from .cache_processes import Server

BIG = os.urandom(3 * 1024 * 1024 + 12345)
SERVER = Path(__file__).with_name("cache_serve_server.py")


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Path, str]:
    store = open_store(str(tmp_path), max_size=1 << 30, fsync=False)
    pending = store.begin_write(digest_of(BIG))
    assert pending is not None
    pending.write(BIG)
    pending.commit().close()
    return tmp_path, digest_of(BIG)


def test_sendfile_is_used_on_plain_tcp(stored: tuple[Path, str]) -> None:
    root, digest = stored
    server = Server(SERVER, str(root), "sendfile")
    try:
        # The one private Twisted detail we rely on still means what we think.
        assert curl(f"{server.base}/selfcheck").body == b"010"
        # Committed by another process: hashed as it is sent the first time, no sendfile...
        result = curl(f"{server.base}/blob/{digest}")
        assert result.status == 200 and result.body == BIG
        counters = server.stats()["counters"]
        assert counters["bytes_from_cache"] == len(BIG)
        assert counters.get("bytes_zero_copy", 0) == 0
        assert counters["verified_objects"] == 1
        # ...then trusted: zero-copy.
        result = curl(f"{server.base}/blob/{digest}")
        assert result.status == 200 and result.body == BIG
        counters = server.stats()["counters"]
        assert counters["bytes_from_cache"] == 2 * len(BIG)
        assert counters["bytes_zero_copy"] > 0.9 * len(BIG)
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["sendfile", "producer"])
def test_ranges_and_head_over_real_sockets(stored: tuple[Path, str], mode: str) -> None:
    root, digest = stored
    server = Server(SERVER, str(root), mode)
    try:
        ranged = curl(f"{server.base}/blob/{digest}", "-r", "1000000-2999999")
        assert ranged.status == 206 and ranged.body == BIG[1000000:3000000]
        assert ranged.header("content-range") == f"bytes 1000000-2999999/{len(BIG)}"
        head = curl(f"{server.base}/blob/{digest}", "-I")
        assert head.status == 200 and head.header("content-length") == str(len(BIG))
        assert head.body == b""
        # Keep-alive: a second response on the same connection after a sendfile'd one.
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("GET", f"/blob/{digest}")
        assert connection.getresponse().read() == BIG
        first_socket = connection.sock
        connection.request("GET", f"/blob/{digest}", headers={"Range": "bytes=0-99"})
        response = connection.getresponse()
        assert response.status == 206 and response.read() == BIG[:100]
        assert connection.sock is first_socket
        connection.close()
    finally:
        server.stop()


def read_slowly(port: int, path: str, pause: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        parts = []
        while chunk := sock.recv(256 * 1024):
            parts.append(chunk)
            time.sleep(pause)
    return b"".join(parts)


def test_a_slow_socket_gets_every_byte_in_order(stored: tuple[Path, str]) -> None:
    root, digest = stored
    server = Server(SERVER, str(root), "sendfile")
    try:
        raw = read_slowly(server.port, f"/blob/{digest}", 0.002)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"200 OK" in head.split(b"\r\n")[0]
        assert hashlib.sha256(body).hexdigest() == digest.split(":")[1]
        assert server.stats()["readers"] == 0
    finally:
        server.stop()


def test_a_client_dropping_mid_body_releases_the_object(stored: tuple[Path, str]) -> None:
    root, digest = stored
    server = Server(SERVER, str(root), "sendfile")
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            sock.sendall(f"GET /blob/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.recv(1000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        eventually(
            lambda: server.stats()["readers"] == 0,
            timeout=20,
            what="the object closed after the client left",
        )
    finally:
        server.stop()


def test_tls_falls_back_to_the_producer(stored: tuple[Path, str], tmp_path: Path) -> None:
    root, digest = stored
    tls = make_ca_and_cert(tmp_path / "tls")
    server = Server(SERVER, str(root), "sendfile", str(tls.cert), str(tls.key))
    try:
        url = f"https://127.0.0.1:{server.port}/blob/{digest}"
        result = curl(url, "--cacert", str(tls.ca_cert))
        assert result.status == 200 and result.body == BIG
        ranged = curl(url, "--cacert", str(tls.ca_cert), "-r", "5-9")
        assert ranged.status == 206 and ranged.body == BIG[5:10]
        stats = curl(f"https://127.0.0.1:{server.port}/stats", "--cacert", str(tls.ca_cert))
        counters = stats.json()["counters"]
        assert counters["bytes_from_cache"] == len(BIG) + 5
        assert counters.get("bytes_zero_copy", 0) == 0
    finally:
        server.stop()
