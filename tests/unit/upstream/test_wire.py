"""The upstream connection protocol (regproxy.upstream._connection) on its own, in memory.

test_agent.py runs it under the pool; these tests drive one connection directly: body
flow control, the ends of bodies, request bodies, and randomized reads and garbage (a
parser must give the same answer however the bytes are split, and never raise out of
``dataReceived`` whatever they are).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer

from regproxy.upstream._connection import ClientConnection, OutgoingRequest, RequestNotSent
from tests.support.inmemory import SyncProducer


class Body(Protocol):
    def __init__(self, pause_first: bool = False, stop_first: bool = False) -> None:
        self.data = b""
        self.reason: Failure | None = None
        self._pause_first = pause_first
        self._stop_first = stop_first

    def connectionMade(self) -> None:
        if self._pause_first:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        if self._stop_first:
            self.transport.stopProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.reason = reason


def producer(data: bytes, length: Any) -> SyncProducer:
    """A body whose announced length may differ from its bytes."""
    made = SyncProducer(data)
    made.length = length
    return made


class Conn:
    def __init__(self) -> None:
        self.idle: list[ClientConnection] = []
        self.protocol = ClientConnection(self.idle.append)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, method: bytes = b"GET", body: IBodyProducer | None = None) -> Deferred[Any]:
        headers = Headers({b"host": [b"registry.example"]})
        return self.protocol.request(OutgoingRequest(method, b"/v2/", headers, body))

    def feed(self, *reads: bytes) -> None:
        for data in reads:
            self.protocol.dataReceived(data)


def outcome(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def test_a_complete_answer_is_held_for_its_reader_without_pausing_the_socket() -> None:
    conn = Conn()
    d = conn.send()
    conn.feed(OK)
    assert conn.transport.producerState == "producing"  # nothing to wait for: no syscalls
    body = Body()
    outcome(d).deliverBody(body)
    assert body.data == b"hello" and body.reason is not None and body.reason.check(ResponseDone)
    assert conn.idle == [conn.protocol]


def test_body_bytes_nobody_reads_yet_pause_the_socket_until_they_are_read() -> None:
    conn = Conn()
    d = conn.send()
    conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b"hel")
    assert conn.transport.producerState == "paused"
    body = Body()
    outcome(d).deliverBody(body)
    assert body.data == b"hel" and body.reason is None
    assert conn.transport.producerState == "producing"
    conn.feed(b"lo, wo")
    assert body.data == b"hello, wo" and body.reason is None
    conn.feed(b"r")
    assert body.data == b"hello, wor" and body.reason is not None
    assert body.reason.check(ResponseDone)
    assert conn.idle == [conn.protocol]


def test_bytes_after_a_whole_answer_are_dropped_with_the_connection() -> None:
    for extra in (b"ld", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"):
        conn = Conn()
        d = conn.send()
        conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", b"lo" + extra)
        body = Body()
        response = outcome(d)
        response.deliverBody(body)
        assert (response.code, body.data) == (200, b"hello")
        assert body.reason is not None and body.reason.check(ResponseDone)
        assert conn.idle == [] and conn.transport.disconnecting


def test_a_paused_reader_gets_nothing_until_it_resumes() -> None:
    conn = Conn()
    d = conn.send()
    conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    body = Body(pause_first=True)
    outcome(d).deliverBody(body)
    assert body.data == b"" and conn.transport.producerState == "paused"
    conn.feed(b"def")  # already in flight when the socket was paused
    assert body.data == b"" and body.reason is None
    body.transport.resumeProducing()  # type: ignore[union-attr]
    assert body.data == b"abcdef" and body.reason is not None and body.reason.check(ResponseDone)
    assert conn.idle == [conn.protocol]


def test_a_reader_that_stops_closes_the_connection() -> None:
    conn = Conn()
    d = conn.send()
    conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc")
    body = Body(stop_first=True)
    outcome(d).deliverBody(body)
    assert conn.transport.disconnecting
    assert body.reason is not None and body.reason.check(ResponseFailed)
    conn.protocol.connectionLost(Failure(ConnectionDone()))
    assert conn.idle == [] and conn.protocol.state != "QUIESCENT"


def test_a_body_ended_by_the_connection_is_potential_data_loss_and_not_reused() -> None:
    conn = Conn()
    d = conn.send()
    conn.feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nsome ")
    response = outcome(d)
    assert response.length is UNKNOWN_LENGTH
    body = Body()
    response.deliverBody(body)
    conn.feed(b"bytes")
    conn.protocol.connectionLost(Failure(ConnectionDone()))
    assert body.data == b"some bytes"
    assert body.reason is not None and body.reason.check(PotentialDataLoss)
    assert conn.idle == []


def test_a_body_ended_by_a_lost_connection_before_its_reader_came_still_reaches_it() -> None:
    conn = Conn()
    d = conn.send()
    conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel")
    conn.protocol.connectionLost(Failure(ConnectionLost()))
    body = Body()
    outcome(d).deliverBody(body)
    assert body.data == b"hel"
    assert body.reason is not None and body.reason.check(ResponseFailed)


def test_an_http_1_0_answer_and_connection_close_are_not_reused() -> None:
    for answer in (
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
    ):
        conn = Conn()
        d = conn.send()
        conn.feed(answer)
        body = Body()
        outcome(d).deliverBody(body)
        assert body.data == b"hello"
        assert conn.idle == [] and conn.transport.disconnecting


def test_hop_by_hop_headers_are_not_response_headers_but_head_keeps_its_length() -> None:
    conn = Conn()
    d = conn.send()
    conn.feed(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
        b"Content-Length: 5\r\nDocker-Content-Digest: sha256:x\r\n\r\nhello"
    )
    response = outcome(d)
    assert response.length == 5
    names = {name.lower() for name, _ in response.headers.getAllRawHeaders()}
    assert names == {b"docker-content-digest"}
    response.deliverBody(Body())
    d = conn.send(b"HEAD")
    conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 123\r\n\r\n")
    head = outcome(d)
    assert head.length == 0
    assert head.headers.getRawHeaders(b"content-length") == [b"123"]


def test_bytes_after_a_head_answer_mean_the_connection_is_not_reused() -> None:
    conn = Conn()
    d = conn.send(b"HEAD")
    conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    body = Body()
    outcome(d).deliverBody(body)
    assert body.data == b"" and body.reason is not None and body.reason.check(ResponseDone)
    assert conn.idle == [] and conn.transport.disconnecting


def test_unasked_bytes_on_an_idle_connection_close_it() -> None:
    conn = Conn()
    d = conn.send()
    conn.feed(OK)
    outcome(d).deliverBody(Body())
    conn.feed(b"HTTP/1.1 200 OK\r\n")
    assert conn.transport.disconnecting
    assert conn.protocol.state != "QUIESCENT"
    assert isinstance(outcome(conn.send()).value, RequestNotSent)


def test_a_switch_of_protocols_nobody_asked_for_fails_the_request() -> None:
    conn = Conn()
    d = conn.send()
    conn.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert isinstance(outcome(d).value, ResponseFailed)
    assert conn.transport.disconnecting


def test_a_header_block_over_the_limit_in_small_reads_fails_the_request() -> None:
    conn = Conn()
    d = conn.send()
    conn.feed(b"HTTP/1.1 200 OK\r\n")
    for index in range(2000):
        conn.feed(b"X-Filler-%d: %s\r\n" % (index, b"a" * 40))
        if conn.transport.disconnecting:
            break
    assert conn.transport.disconnecting
    assert isinstance(outcome(d).value, ResponseFailed)


def test_a_request_body_of_known_length_is_framed_by_content_length() -> None:
    conn = Conn()
    d = conn.send(b"POST", producer(b"grant_type=x", 12))
    sent = conn.transport.value()
    assert b"\r\nContent-Length: 12\r\n\r\ngrant_type=x" in sent
    conn.feed(OK)
    outcome(d).deliverBody(Body())
    assert conn.idle == []  # a connection that carried a body is not reused


def test_a_request_body_of_unknown_length_is_chunked() -> None:
    conn = Conn()
    conn.send(b"POST", producer(b"abc", UNKNOWN_LENGTH))
    sent = conn.transport.value()
    assert b"\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" in sent


def test_a_body_shorter_than_announced_fails_the_request() -> None:
    conn = Conn()
    d = conn.send(b"POST", producer(b"abc", 10))
    assert isinstance(outcome(d).value, Exception)
    assert conn.transport.disconnecting


def test_a_post_without_body_says_its_length_is_zero() -> None:
    conn = Conn()
    conn.send(b"POST")
    assert b"\r\nContent-Length: 0\r\n\r\n" in conn.transport.value()


ANSWERS = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world", b"hello world"),
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1;x=y\r\n \r\n5\r\nworld\r\n0\r\nTrailer: z\r\n\r\n",
        b"hello world",
    ),
    (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
        b"hello world",
    ),
]


@settings(max_examples=200, deadline=None)
@given(
    which=st.sampled_from(range(len(ANSWERS))),
    cuts=st.lists(st.integers(min_value=1, max_value=200), max_size=12),
    pause_at=st.integers(min_value=0, max_value=5),
)
def test_an_answer_is_the_same_however_its_bytes_are_split(
    which: int, cuts: list[int], pause_at: int
) -> None:
    wire, expected = ANSWERS[which]
    points = sorted({cut % len(wire) for cut in cuts} - {0})
    reads = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    conn = Conn()
    for _ in range(2):  # twice on one connection: the second must be framed as well
        conn_body = Body()
        d = conn.send()
        for index, data in enumerate(reads):
            conn.feed(data)
            if index == pause_at and fired(d) and conn_body.transport is None:
                outcome(d).deliverBody(conn_body)
        if conn_body.transport is None:
            outcome(d).deliverBody(conn_body)
        assert conn_body.data == expected
        assert conn_body.reason is not None and conn_body.reason.check(ResponseDone)
        assert conn.protocol.state == "QUIESCENT"


def fired(d: Deferred[Any]) -> bool:
    results: list[Any] = []
    d.addBoth(lambda r: results.append(r) or r)
    return bool(results)


@settings(max_examples=300, deadline=None)
@given(
    garbage=st.binary(max_size=300),
    prefix=st.sampled_from(
        [b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
    ),
)
def test_garbage_never_escapes_the_protocol(garbage: bytes, prefix: bytes) -> None:
    """Whatever the upstream sends, ``dataReceived`` returns: the request fails or its
    body ends, and a connection whose answer was not clean is never reused."""
    conn = Conn()
    d = conn.send()
    conn.feed(prefix, garbage)
    body = Body()
    answers: list[Any] = []
    d.addBoth(answers.append)
    if answers and not isinstance(answers[0], Failure):
        answers[0].deliverBody(body)
    conn.protocol.connectionLost(Failure(ConnectionDone()))
    assert answers, "the request neither got an answer nor failed"
    if conn.idle:
        assert body.reason is not None and body.reason.check(ResponseDone)


def test_abort_fires_once_closed_and_at_once_when_already_closed() -> None:
    conn = Conn()
    closing = conn.protocol.abort()
    assert not fired(closing)
    conn.protocol.connectionLost(Failure(ConnectionDone()))
    assert fired(closing)
    # Stopped by its reader earlier, lost since: aborting again does not wait for ever.
    assert fired(conn.protocol.abort())
