"""Serving committed objects: Range, HEAD, backpressure with flat memory (in memory, through
twisted.web's real Request and HTTPChannel), and os.sendfile on real plain TCP sockets (a
server process of its own, fetched with curl and raw sockets)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from regproxy.cache import serve
from regproxy.cache.metrics import RecordingMetrics
from regproxy.cache.serve import (
    ByteRange,
    CorruptObject,
    Unsatisfiable,
    choose_range,
    parse_range,
    serve_object,
)
from regproxy.cache.store import CacheStore, open_store

from .cache_helpers import digest_of

BIG = os.urandom(3 * 1024 * 1024 + 12345)


# Range parsing.


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        (b"bytes=0-9", ByteRange(0, 9)),
        (b"bytes=10-", ByteRange(10, 99)),
        (b"bytes=-10", ByteRange(90, 99)),
        (b"bytes=-1000", ByteRange(0, 99)),
        (b"bytes=90-1000", ByteRange(90, 99)),
        (b"bytes=100-", Unsatisfiable()),
        (b"bytes=-0", Unsatisfiable()),
        (b"bytes=9-3", None),
        (b"bytes=0-1,5-6", None),
        (b"items=0-1", None),
        (b"bytes=-", None),
    ],
)
def test_parse_range_follows_rfc_9110(header: bytes | None, expected: object) -> None:
    assert parse_range(header, 100) == expected


def test_no_range_is_satisfiable_on_an_empty_object() -> None:
    assert parse_range(b"bytes=0-", 0) == Unsatisfiable()
    assert parse_range(b"bytes=-5", 0) == Unsatisfiable()


# In memory: twisted.web's real Request and HTTPChannel on a transport that pushes back.


class PushbackTransport(StringTransport):
    """A socket whose buffer holds ``limit`` bytes: it pauses its producer like Twisted's
    tcp transport does, and ``drain`` resumes it once the client has read."""

    def __init__(self, limit: int = 65536) -> None:
        super().__init__()
        self.limit = limit
        self.unread = 0
        self.most_unread = 0
        self.paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unread += len(data)
        self.most_unread = max(self.most_unread, self.unread)
        if self.unread > self.limit and self.producer is not None and not self.paused:
            self.paused = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.unread = 0
        if self.paused and self.producer is not None:
            self.paused = False
            self.producer.resumeProducing()


class Serving(Resource):
    isLeaf = True

    def __init__(self, store: CacheStore, metrics: RecordingMetrics) -> None:
        super().__init__()
        self.store = store
        self.metrics = metrics
        self.outcomes: list[Any] = []

    def render_GET(self, request: Request) -> object:
        obj = self.store.open_object(request.postpath[0].decode())
        assert obj is not None
        d = serve_object(
            request, obj, byte_range=choose_range(request, obj.size), metrics=self.metrics
        )
        d.addBoth(self.outcomes.append)
        return NOT_DONE_YET

    render_HEAD = render_GET


class Client:
    """A store holding ``data`` served through twisted.web in memory. ``restarted``: the
    serving store is a fresh one on the same directory (as after a restart), so the object
    is one this process has not hashed yet."""

    def __init__(
        self, tmp_path: Path, data: bytes = BIG, *, restarted: bool = False, **store_kwargs: Any
    ) -> None:
        self.metrics = RecordingMetrics()
        self.store = open_store(
            str(tmp_path), max_size=1 << 30, fsync=False, metrics=self.metrics, **store_kwargs
        )
        pending = self.store.begin_write(digest_of(data))
        assert pending is not None
        pending.write(data)
        pending.commit().close()
        self.digest = digest_of(data)
        if restarted:
            self.store = open_store(
                str(tmp_path), max_size=1 << 30, fsync=False, metrics=self.metrics, **store_kwargs
            )
        self.resource = Serving(self.store, self.metrics)
        self.transport = PushbackTransport()
        self.clock = MemoryReactorClock()
        self.channel = Site(self.resource, reactor=self.clock).buildProtocol(None)
        self.channel.makeConnection(self.transport)
        self.aborted: list[bool] = []
        self.transport.abortConnection = lambda: self.aborted.append(True)  # type: ignore[method-assign]

    def pump(self) -> int:
        """Let the client read and the reactor turn until nothing moves; returns the turns."""
        turns = 0
        while not self.aborted and (self.transport.paused or self.due()):
            self.transport.drain()
            self.clock.advance(0)
            turns += 1
        return turns

    def due(self) -> list[Any]:
        """Calls for this very turn (the site's log clock and timeouts are for later)."""
        now = self.clock.seconds()
        return [call for call in self.clock.getDelayedCalls() if call.getTime() <= now]

    @property
    def path(self) -> str:
        return self.store.object_path(self.digest.split(":")[1])

    def request(self, method: str = "GET", *headers: str) -> None:
        lines = [f"{method} /{self.digest} HTTP/1.1", "Host: cache", *headers, "", ""]
        self.channel.dataReceived("\r\n".join(lines).encode())

    def response(self) -> tuple[bytes, dict[bytes, bytes], bytes]:
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines)
        return status, headers, body

    def readers(self) -> int:
        return sum(entry.readers for entry in self.store._entries.values())


def test_a_whole_object_is_sent_with_its_length(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.request()
    while client.transport.paused:
        client.transport.drain()
    status, headers, body = client.response()
    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"content-length"] == b"%d" % len(BIG)
    assert headers[b"accept-ranges"] == b"bytes"
    assert body == BIG
    assert client.resource.outcomes == [len(BIG)]
    assert client.metrics.counters["bytes_from_cache"] == len(BIG)
    assert client.readers() == 0


def test_a_slow_client_is_fed_no_faster_than_it_reads(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.request()
    rounds = 0
    while client.transport.paused:
        # Never more than the socket buffer plus one chunk waiting: flat memory.
        assert client.transport.unread <= 65536 + 64 * 1024 + 1024
        client.transport.drain()
        rounds += 1
    assert rounds >= len(BIG) // (128 * 1024)
    assert client.response()[2] == BIG


def test_a_range_is_206_with_its_content_range(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.request("GET", "Range: bytes=1000-200999")
    while client.transport.paused:
        client.transport.drain()
    status, headers, body = client.response()
    assert status == b"HTTP/1.1 206 Partial Content"
    assert headers[b"content-range"] == b"bytes 1000-200999/%d" % len(BIG)
    assert headers[b"content-length"] == b"200000"
    assert body == BIG[1000:201000]


def test_a_range_past_the_end_is_416_with_an_oci_error(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.request("GET", f"Range: bytes={len(BIG)}-")
    status, headers, body = client.response()
    assert status.startswith(b"HTTP/1.1 416 ")
    assert headers[b"content-range"] == b"bytes */%d" % len(BIG)
    assert json.loads(body)["errors"][0]["code"] == "RANGE_INVALID"
    assert client.readers() == 0


def test_if_range_for_something_else_gets_the_whole_object(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.request("GET", "Range: bytes=0-9", 'If-Range: "sha256:other"')
    while client.transport.paused:
        client.transport.drain()
    status, _, body = client.response()
    assert status == b"HTTP/1.1 200 OK" and body == BIG


def test_head_sends_the_length_and_no_body(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.request("HEAD")
    status, headers, body = client.response()
    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"content-length"] == b"%d" % len(BIG)
    assert body == b""
    assert client.readers() == 0


def test_a_small_object_is_served_from_its_verified_bytes(tmp_path: Path) -> None:
    manifest = b'{"schemaVersion":2}'
    client = Client(tmp_path, manifest)
    client.request("GET", "Range: bytes=1-5")
    status, _, body = client.response()
    assert status == b"HTTP/1.1 206 Partial Content" and body == manifest[1:6]


def test_a_client_leaving_mid_body_closes_the_object(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.request()
    assert client.readers() == 1
    client.channel.connectionLost(Exception("gone"))
    assert client.readers() == 0
    assert len(client.resource.outcomes) == 1
    assert client.metrics.counters["bytes_from_cache"] < len(BIG)


def test_a_file_cut_short_on_disk_aborts_instead_of_finishing(tmp_path: Path) -> None:
    client = Client(tmp_path)
    aborted = client.aborted
    obj = client.store.open_object(client.digest)
    assert obj is not None
    obj.close()
    path = client.store.object_path(client.digest.split(":")[1])
    client.request()
    os.truncate(path, 100_000)  # after the open: size checks already passed
    while client.transport.paused and not aborted:
        client.transport.drain()
    assert aborted == [True]
    assert len(client.response()[2]) < len(BIG)


def test_serving_keeps_no_descriptor_open(tmp_path: Path) -> None:
    client = Client(tmp_path)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        client.transport.clear()
        client.request()
        while client.transport.paused:
            client.transport.drain()
    assert len(os.listdir("/proc/self/fd")) == before


# Objects this process has not hashed yet: verified as they are served.


def corrupt_in_place(path: str, offset: int) -> None:
    """Flip a byte, keeping size and modification time: what the open-time checks see."""
    stat = os.stat(path)
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_object_committed_here_is_trusted_without_hashing(tmp_path: Path) -> None:
    client = Client(tmp_path)
    assert client.store.verified(client.digest)
    corrupt_in_place(client.path, 10)  # after the commit: only a scrub would notice
    client.request()
    client.pump()
    assert client.response()[2][10] != BIG[10]  # served as trusted: not hashed again


def test_an_unhashed_object_is_hashed_as_served_then_trusted(tmp_path: Path) -> None:
    client = Client(tmp_path, restarted=True)
    assert not client.store.verified(client.digest)
    client.request()
    client.pump()
    status, _, body = client.response()
    assert status == b"HTTP/1.1 200 OK" and body == BIG
    assert client.resource.outcomes == [len(BIG)]
    assert client.store.verified(client.digest)
    assert client.metrics.counters["verified_objects"] == 1
    assert client.readers() == 0


@pytest.mark.parametrize("offset", [0, len(BIG) // 2, len(BIG) - 1])
def test_a_corrupt_unhashed_object_is_cut_before_its_last_chunk_and_removed(
    tmp_path: Path, offset: int
) -> None:
    client = Client(tmp_path, restarted=True)
    corrupt_in_place(client.path, offset)
    client.request()
    client.pump()
    assert client.aborted == [True]
    body = client.response()[2]
    # The last chunk never left: no client holds a complete wrong body.
    assert len(body) <= len(BIG) - (len(BIG) % serve.CHUNK or serve.CHUNK)
    assert not os.path.exists(client.path)
    assert client.metrics.counters["corrupt_objects"] == 1
    assert client.store.open_object(client.digest) is None  # the next request fetches anew
    assert client.readers() == 0
    [outcome] = client.resource.outcomes
    assert outcome.check(CorruptObject)


def test_a_range_of_an_unhashed_object_waits_for_the_whole_object_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serve, "HASH_SLICE", 256 * 1024)
    client = Client(tmp_path, restarted=True)
    turns: list[float] = []
    call_later = client.clock.callLater

    def counted(delay: float, *args: Any, **kwargs: Any) -> Any:
        turns.append(delay)
        return call_later(delay, *args, **kwargs)

    client.clock.callLater = counted  # type: ignore[method-assign]
    client.request("GET", "Range: bytes=1000-200999")
    # The range's bytes but its last chunk are out; the rest of the object is hashed a
    # slice per reactor turn, never all in one.
    assert len(client.response()[2]) < 200000
    client.pump()
    assert turns.count(0) >= len(BIG) // (256 * 1024) - 1
    status, _, body = client.response()
    assert status == b"HTTP/1.1 206 Partial Content" and body == BIG[1000:201000]
    assert client.store.verified(client.digest)


def test_a_range_of_a_corrupt_unhashed_object_is_cut_even_when_the_fault_is_outside(
    tmp_path: Path,
) -> None:
    client = Client(tmp_path, restarted=True)
    corrupt_in_place(client.path, len(BIG) - 5)  # far after the range
    client.request("GET", "Range: bytes=100-299")
    client.pump()
    assert client.aborted == [True]
    assert len(client.response()[2]) < 200
    assert not os.path.exists(client.path)


def test_a_client_leaving_while_an_object_is_hashed_stops_the_hashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serve, "HASH_SLICE", 256 * 1024)
    client = Client(tmp_path, restarted=True)
    client.request("GET", "Range: bytes=0-9")
    assert client.due()
    client.channel.connectionLost(Exception("gone"))
    assert client.due() == []
    assert client.readers() == 0
    assert not client.store.verified(client.digest)


# Real sockets, a real reactor, in a server process of its own.
