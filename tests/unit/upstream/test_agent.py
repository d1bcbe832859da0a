"""The protocol battery of regproxy's own agent (regproxy.upstream._pool), in memory.

Every test runs the real connection protocol (``regproxy.upstream._connection``) over a
``StringTransport``: the upstream's bytes are fed to it as a socket would, so what is tested
is framing, reuse and loss as they happen on the wire, not a fake's idea of them.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from regproxy.upstream._pool import PooledAgent, UpstreamPool, host_value, should_retry
from tests.support.inmemory import SyncProducer


class Wire:
    """One upstream connection: the protocol and the bytes the agent wrote to it."""

    def __init__(self, protocol: Any, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def sent(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def answer(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self, reason: type[Exception] = ConnectionDone) -> None:
        self.protocol.connectionLost(Failure(reason()))


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    def __init__(self) -> None:
        self.wires: list[Wire] = []
        self.pending: Deferred[Any] | None = None

    def connect(self, factory: Factory) -> Deferred[Any]:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.wires.append(Wire(protocol, transport))
        return succeed(protocol)


@implementer(IAgentEndpointFactory)
class MemoryEndpoints:
    def __init__(self) -> None:
        self.endpoint = MemoryEndpoint()
        self.asked: list[bytes] = []

    def endpointForURI(self, uri: URI) -> MemoryEndpoint:
        self.asked.append(uri.toBytes())
        return self.endpoint


class Body(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.reason = reason


URL = b"http://registry.example:5000/v2/app/manifests/latest"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def endpoints() -> MemoryEndpoints:
    return MemoryEndpoints()


@pytest.fixture
def agent(clock: MemoryReactorClock, endpoints: MemoryEndpoints) -> PooledAgent:
    return PooledAgent(clock, endpoints, max_idle_per_origin=2, idle_timeout=60)


def result(d: Deferred[Any]) -> Any:
    """The Deferred's result, which must already be there."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def fired(d: Deferred[Any]) -> bool:
    results: list[Any] = []
    d.addBoth(lambda r: results.append(r) or r)
    return bool(results)


def read(response: IResponse) -> Body:
    body = Body()
    response.deliverBody(body)
    return body


def get(agent: PooledAgent, url: bytes = URL, method: bytes = b"GET", **kw: Any) -> Deferred[Any]:
    return agent.request(method, url, Headers({b"accept": [b"*/*"]}), **kw)


# -- framing -------------------------------------------------------------------------------------


def test_the_request_line_and_host_go_out_as_origin_form(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    get(agent, URL + b"?n=1")
    wire = endpoints.endpoint.wires[0]
    head = wire.sent()
    assert head.startswith(b"GET /v2/app/manifests/latest?n=1 HTTP/1.1\r\n")
    assert b"\r\nHost: registry.example:5000\r\n" in head
    assert b"\r\nAccept: */*\r\n" in head
    assert b"Connection: close" not in head


def test_host_omits_the_default_port_and_brackets_ipv6() -> None:
    assert host_value(URI.fromBytes(b"https://r.example/v2/")) == b"r.example"
    assert host_value(URI.fromBytes(b"http://r.example:80/v2/")) == b"r.example"
    assert host_value(URI.fromBytes(b"http://[::1]:5000/v2/")) == b"[::1]:5000"


def test_a_fixed_length_body_arrives_whole_and_the_connection_is_reused(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    first = get(agent)
    wire = endpoints.endpoint.wires[0]
    wire.answer(OK)
    response = result(first)
    assert (response.code, response.length) == (200, 5)
    body = read(response)
    assert body.data == b"hello" and body.reason is not None and body.reason.check(ResponseDone)
    assert agent.idle_count() == 1
    wire.sent()
    second = get(agent)
    assert len(endpoints.endpoint.wires) == 1, "the idle connection was not reused"
    assert wire.sent().startswith(b"GET /v2/")
    wire.answer(OK)
    assert read(result(second)).data == b"hello"


def test_a_chunked_body_is_decoded_and_has_no_length(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    d = get(agent)
    wire = endpoints.endpoint.wires[0]
    wire.answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\n\r\n"
    )
    response = result(d)
    assert response.length is UNKNOWN_LENGTH
    assert read(response).data == b"abcdefg"
    assert agent.idle_count() == 1


def test_head_reads_no_body_whatever_content_length_says(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    d = get(agent, method=b"HEAD")
    wire = endpoints.endpoint.wires[0]
    wire.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    response = result(d)
    assert read(response).data == b""
    assert agent.idle_count() == 1
    # The next answer on the connection is framed from its own first byte.
    wire.sent()
    second = get(agent)
    wire.answer(OK)
    assert read(result(second)).data == b"hello"


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
def test_bodyless_statuses_end_at_the_headers(
    agent: PooledAgent, endpoints: MemoryEndpoints, status: bytes
) -> None:
    d = get(agent)
    endpoints.endpoint.wires[0].answer(b"HTTP/1.1 " + status + b"\r\nContent-Length: 9\r\n\r\n")
    assert read(result(d)).data == b""
    assert agent.idle_count() == 1


def test_interim_1xx_answers_are_skipped(agent: PooledAgent, endpoints: MemoryEndpoints) -> None:
    d = get(agent)
    wire = endpoints.endpoint.wires[0]
    wire.answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
    assert not fired(d)
    wire.answer(OK)
    response = result(d)
    assert response.code == 200
    assert read(response).data == b"hello"


# -- smuggling shapes and oversized answers ----------------------------------------------------


def test_content_length_with_transfer_encoding_is_refused_and_the_connection_dropped(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    """RFC 9112 6.3: a message with both "ought to be handled as an error" (it is the shape
    of response splitting). The request fails, nothing of the body is passed on, and the
    connection, whose framing is now in doubt, is never used again."""
    d = get(agent)
    wire = endpoints.endpoint.wires[0]
    wire.answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    with pytest.raises(ResponseFailed):
        result(d)
    assert wire.transport.disconnecting
    assert agent.idle_count() == 0
    get(agent)
    assert len(endpoints.endpoint.wires) == 2


def test_an_unknown_transfer_coding_fails_the_request(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    d = get(agent)
    wire = endpoints.endpoint.wires[0]
    wire.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n")
    wire.lose()
    with pytest.raises(ResponseFailed):
        result(d)
    assert agent.idle_count() == 0


def test_conflicting_content_lengths_fail_the_request(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    d = get(agent)
    wire = endpoints.endpoint.wires[0]
    wire.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
    wire.lose()
    with pytest.raises(ResponseFailed):
        result(d)
    assert agent.idle_count() == 0


def test_an_oversized_header_line_drops_the_connection(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    d = get(agent)
    wire = endpoints.endpoint.wires[0]
    wire.answer(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000)
    assert wire.transport.disconnecting
    wire.lose(ConnectionLost)
    with pytest.raises(ResponseFailed):
        result(d)
    assert agent.idle_count() == 0


def test_a_body_cut_short_is_an_error_and_the_connection_is_not_reused(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    d = get(agent)
    wire = endpoints.endpoint.wires[0]
    wire.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel")
    body = read(result(d))
    wire.lose(ConnectionLost)
    assert body.reason is not None and body.reason.check(ResponseFailed)
    assert not body.reason.check(ResponseDone, PotentialDataLoss)
    get(agent)
    assert len(endpoints.endpoint.wires) == 2


def test_connection_close_is_honoured(agent: PooledAgent, endpoints: MemoryEndpoints) -> None:
    d = get(agent)
    wire = endpoints.endpoint.wires[0]
    wire.answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello")
    assert read(result(d)).data == b"hello"
    assert agent.idle_count() == 0
    assert wire.transport.disconnecting
    get(agent)
    assert len(endpoints.endpoint.wires) == 2


# -- the pool: no pipelining, reuse, loss, retry -----------------------------------------------


def test_concurrent_requests_each_get_a_connection_never_a_pipeline(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    first, second = get(agent), get(agent)
    wires = endpoints.endpoint.wires
    assert len(wires) == 2
    assert wires[0].sent().count(b"HTTP/1.1\r\n") == 1
    assert wires[1].sent().count(b"HTTP/1.1\r\n") == 1
    # The first connection carries nothing more until its answer is complete.
    wires[0].answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
    response = result(first)
    body = read(response)
    third = get(agent)
    assert wires[0].sent() == b""
    assert len(wires) == 3
    wires[0].answer(b"llo")
    assert body.data == b"hello"
    for d, wire in ((second, wires[1]), (third, wires[2])):
        wire.answer(OK)
        read(result(d))
    assert agent.idle_count() == 2  # max_idle_per_origin: the third one is closed
    assert sum(w.transport.disconnecting for w in wires) == 1


def test_a_connection_lost_while_idle_is_not_used_again(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    d = get(agent)
    wire = endpoints.endpoint.wires[0]
    wire.answer(OK)
    read(result(d))
    wire.lose()
    get(agent)
    assert len(endpoints.endpoint.wires) == 2
    assert endpoints.endpoint.wires[1].sent().startswith(b"GET ")


def test_an_idempotent_request_on_a_stale_connection_is_sent_once_more(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    """The race every pool has: the upstream closed the idle connection just as the request
    went out on it. No byte of an answer came, so the GET goes again on a new connection."""
    warm = get(agent)
    stale = endpoints.endpoint.wires[0]
    stale.answer(OK)
    read(result(warm))
    d = get(agent)
    assert stale.sent().startswith(b"GET ")
    stale.lose()
    assert len(endpoints.endpoint.wires) == 2
    fresh = endpoints.endpoint.wires[1]
    assert fresh.sent().startswith(b"GET /v2/app/manifests/latest HTTP/1.1")
    fresh.answer(OK)
    assert read(result(d)).data == b"hello"


def test_a_request_with_a_body_is_not_sent_twice(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    warm = get(agent)
    stale = endpoints.endpoint.wires[0]
    stale.answer(OK)
    read(result(warm))
    d = agent.request(b"POST", URL, Headers(), SyncProducer(b"grant_type=x"))
    stale.lose()
    with pytest.raises(Exception):  # noqa: B017 - whatever failure, it is not retried
        result(d)
    assert len(endpoints.endpoint.wires) == 1


def test_a_failure_after_the_first_answer_byte_is_not_retried(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    warm = get(agent)
    stale = endpoints.endpoint.wires[0]
    stale.answer(OK)
    read(result(warm))
    d = get(agent)
    stale.answer(b"HTTP/1.1 200")
    stale.lose(ConnectionLost)
    with pytest.raises(ResponseFailed):
        result(d)
    assert len(endpoints.endpoint.wires) == 1


def test_a_failure_on_a_new_connection_is_not_retried(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    d = get(agent)
    endpoints.endpoint.wires[0].lose()
    with pytest.raises(Exception):  # noqa: B017
        result(d)
    assert len(endpoints.endpoint.wires) == 1


def test_retry_rules() -> None:
    from twisted.web.client import RequestTransmissionFailed, ResponseNeverReceived

    lost = ResponseNeverReceived([Failure(ConnectionDone())])
    assert should_retry(b"GET", lost, None)
    assert should_retry(b"HEAD", RequestTransmissionFailed([Failure(ConnectionLost())]), None)
    assert not should_retry(b"POST", lost, None)
    assert not should_retry(b"GET", lost, object())  # type: ignore[arg-type]
    assert not should_retry(b"GET", ResponseFailed([Failure(ConnectionLost())]), None)
    assert not should_retry(b"GET", ResponseNeverReceived([Failure(CancelledError())]), None)


def test_cancelling_while_waiting_aborts_that_connection(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    d = get(agent)
    wire = endpoints.endpoint.wires[0]
    d.cancel()
    assert wire.transport.disconnecting or wire.protocol.state != "QUIESCENT"
    with pytest.raises((CancelledError, ResponseNeverReceived)) as raised:
        result(d)
    if isinstance(raised.value, ResponseNeverReceived):  # as Twisted's Agent reports it
        assert raised.value.reasons[0].check(CancelledError)
    assert agent.idle_count() == 0
    get(agent)
    assert len(endpoints.endpoint.wires) == 2


def test_idle_connections_expire(
    agent: PooledAgent, endpoints: MemoryEndpoints, clock: MemoryReactorClock
) -> None:
    d = get(agent)
    wire = endpoints.endpoint.wires[0]
    wire.answer(OK)
    read(result(d))
    clock.advance(61)
    assert agent.idle_count() == 0 or wire.transport.disconnecting
    clock.advance(31)
    assert agent.idle_count() == 0
    assert wire.transport.disconnecting
    get(agent)
    assert len(endpoints.endpoint.wires) == 2


def test_an_old_idle_connection_is_not_taken_before_the_sweep(
    clock: MemoryReactorClock, endpoints: MemoryEndpoints
) -> None:
    agent = PooledAgent(clock, endpoints, idle_timeout=60)
    d = get(agent)
    wire = endpoints.endpoint.wires[0]
    wire.answer(OK)
    read(result(d))
    clock.seconds = lambda: 1000.0  # type: ignore[method-assign]  # time moved, no sweep ran
    get(agent)
    assert len(endpoints.endpoint.wires) == 2
    assert wire.transport.disconnecting


def test_the_endpoint_is_asked_once_per_origin(
    agent: PooledAgent, endpoints: MemoryEndpoints
) -> None:
    get(agent, b"http://registry.example:5000/v2/a")
    get(agent, b"http://registry.example:5000/v2/b")
    get(agent, b"http://other.example/v2/")
    assert endpoints.asked == [b"http://registry.example:5000/v2/a", b"http://other.example/v2/"]


def test_an_unusable_url_fails_the_deferred_not_the_caller(agent: PooledAgent) -> None:
    with pytest.raises(Exception):  # noqa: B017
        result(agent.request(b"GET", b"http://registry.example/v2/ x"))


def test_close_cached_connections_closes_the_idle_ones(
    clock: MemoryReactorClock, endpoints: MemoryEndpoints
) -> None:
    pool = UpstreamPool(clock)
    agent = pool.agent(endpoints)
    d = get(agent)
    wire = endpoints.endpoint.wires[0]
    wire.answer(OK)
    read(result(d))
    closed = pool.closeCachedConnections()
    assert wire.transport.disconnecting or wire.protocol.state == "ABORTED"
    wire.lose()
    result(closed)
    assert agent.idle_count() == 0


def test_upstream_sockets_are_read_in_larger_pieces() -> None:
    """Plain TCP and TLS (whose transport wraps the TCP one) alike; never smaller."""
    from twisted.internet import tcp

    from regproxy.upstream._connection import READ_SIZE, read_larger

    class Socket:
        bufferSize = tcp.Connection.bufferSize

        def doRead(self) -> None:
            pass

    class TLS:
        def __init__(self, inner: Socket) -> None:
            self.transport = inner

    plain, under_tls = Socket(), Socket()
    read_larger(plain)
    read_larger(TLS(under_tls))
    assert plain.bufferSize == under_tls.bufferSize == READ_SIZE > tcp.Connection.bufferSize
    huge = Socket()
    huge.bufferSize = 4 * READ_SIZE
    read_larger(huge)
    assert huge.bufferSize == 4 * READ_SIZE
    read_larger(StringTransport())  # nothing to raise: left alone


def test_a_real_tcp_connection_gets_the_larger_read_size() -> None:
    """Twisted's own TCP transport class, so a Twisted change cannot hide."""
    from twisted.internet import tcp

    from regproxy.upstream._connection import READ_SIZE, read_larger

    connection = tcp.Connection.__new__(tcp.Connection)
    read_larger(connection)
    assert connection.bufferSize == READ_SIZE
