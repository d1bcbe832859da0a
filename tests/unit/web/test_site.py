"""The site's edges: client addresses behind proxies, health, readiness and body limits."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from regproxy.config import Config, Route, Upstream
from regproxy.web.health import Health, Readiness
from regproxy.web.observe import ClientAddress, Metrics
from regproxy.web.public import public_base
from regproxy.web.site import MAX_REQUEST_BODY, ProxySite

TRUSTED = ClientAddress(["10.0.0.0/8", "fd00::/8", "192.168.1.1"])


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        # The peer is a trusted proxy: walk from the right past trusted hops.
        ("10.0.0.1", [b"203.0.113.7"], "203.0.113.7"),
        ("10.0.0.1", [b"203.0.113.7, 10.0.0.2"], "203.0.113.7"),
        ("10.0.0.1", [b"198.51.100.1, 203.0.113.7, 10.0.0.2"], "203.0.113.7"),
        ("10.0.0.1", [b"198.51.100.1", b"203.0.113.7", b"10.9.9.9"], "203.0.113.7"),
        ("fd00::1", [b"2001:db8::1"], "2001:db8::1"),
        ("192.168.1.1", [b"203.0.113.7,,  "], "203.0.113.7"),
        # Every hop trusted: the leftmost is the best there is.
        ("10.0.0.1", [b"10.1.1.1, 10.2.2.2"], "10.1.1.1"),
        # A spoofed header from an untrusted peer is ignored.
        ("203.0.113.9", [b"10.0.0.5"], "203.0.113.9"),
        ("192.168.1.2", [b"1.2.3.4"], "192.168.1.2"),
        ("10.0.0.1", None, "10.0.0.1"),
        ("10.0.0.1", [], "10.0.0.1"),
        ("-", [b"1.2.3.4"], "-"),
    ],
)
def test_client_address(peer: str, forwarded: list[bytes] | None, expected: str) -> None:
    assert TRUSTED.resolve(peer, forwarded) == expected


def test_client_address_without_trusted_networks() -> None:
    untrusting = ClientAddress(())
    assert not untrusting.is_trusted("10.0.0.1")
    assert untrusting.resolve("10.0.0.1", [b"1.2.3.4"]) == "10.0.0.1"


def test_is_trusted() -> None:
    assert TRUSTED.is_trusted("10.255.0.1")
    assert TRUSTED.is_trusted("192.168.1.1")
    assert not TRUSTED.is_trusted("192.168.1.2")
    assert not TRUSTED.is_trusted("not an address")
    assert not TRUSTED.is_trusted("")


def _render(resource: Resource, path: bytes = b"/readyz", method: bytes = b"GET") -> DummyRequest:
    request = DummyRequest([path.strip(b"/")])
    request.method = method
    body = resource.render(request)
    request.write(body)
    request.finish()
    return request


def test_health_ok() -> None:
    request = _render(Health(Readiness()))
    assert request.responseCode in (None, 200)
    assert b"".join(request.written) == b"ok\n"
    assert request.responseHeaders.getRawHeaders(b"cache-control") == [b"no-store"]


def test_readyz_503_while_draining() -> None:
    readiness = Readiness()
    readyz, healthz = Health(readiness), Health()
    readiness.draining = True
    request = _render(readyz)
    assert request.responseCode == 503
    assert b"".join(request.written) == b"draining\n"
    head = _render(readyz, method=b"HEAD")
    assert head.responseCode == 503
    # Liveness does not drain: the process is alive until it exits.
    assert b"".join(_render(healthz).written) == b"ok\n"


def _public_base(headers: dict[bytes, bytes], config: Config, secure: bool = False) -> str:
    request = DummyRequest([b""])
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name, [value])
    request.isSecure = lambda: secure  # type: ignore[method-assign]
    return public_base(request, config)  # type: ignore[arg-type]


CONFIG = Config(routes=(Route(Upstream("https", "gcr.io")),))


@pytest.mark.parametrize(
    ("headers", "secure", "expected"),
    [
        ({b"host": b"R.Example.com"}, False, "http://r.example.com"),
        ({b"host": b"r.example.com:8443"}, True, "https://r.example.com:8443"),
        (
            {b"host": b"r.example.com", b"x-forwarded-proto": b"https"},
            False,
            "https://r.example.com",
        ),
        (
            {b"host": b"r.example.com", b"x-forwarded-proto": b"HTTPS, http"},
            False,
            "https://r.example.com",
        ),
        (
            {b"host": b"r.example.com", b"x-forwarded-proto": b"gopher"},
            True,
            "https://r.example.com",
        ),
        ({b"host": b"[::1]:5000"}, False, "http://[::1]:5000"),
        # A Host that could inject into a header or a URL is replaced by the listener's.
        ({b"host": b'evil.example/"x'}, False, "http://127.0.0.1:80"),
        ({b"host": b"a.example\r\nX: y"}, False, "http://127.0.0.1:80"),
        ({b"host": b"user@evil.example"}, False, "http://127.0.0.1:80"),
    ],
)
def test_public_base(headers: dict[bytes, bytes], secure: bool, expected: str) -> None:
    assert _public_base(headers, CONFIG, secure) == expected


def test_public_url_wins() -> None:
    config = Config(routes=CONFIG.routes, public_url="https://public.example")
    headers = {b"host": b"other.example", b"x-forwarded-proto": b"http"}
    assert _public_base(headers, config) == "https://public.example"


class Echo(Resource):
    isLeaf = True

    def render(self, request):  # type: ignore[no-untyped-def]
        assert request.content is not None
        return b"got %d" % len(request.content.read())


def _serve(raw: bytes) -> tuple[bytes, Metrics]:
    metrics = Metrics()
    site = ProxySite(Echo(), metrics=metrics, client_address=ClientAddress(()))
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    assert site.active == 0
    output = transport.value()
    protocol.connectionLost(None)  # type: ignore[arg-type]
    return output, metrics


def test_request_id_and_metrics() -> None:
    output, metrics = _serve(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert output.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nX-Request-Id: " in output
    sample = metrics.registry.get_sample_value(
        "regproxy_requests_total",
        {"route": "none", "endpoint": "other", "method": "GET", "status": "200"},
    )
    assert sample == 1.0


def test_small_bodies_are_read() -> None:
    body = b"a=" + b"x" * 100
    output, _ = _serve(
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert output.endswith(b"got 102")


def test_large_declared_body_refused() -> None:
    output, _ = _serve(
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (MAX_REQUEST_BODY + 1)
    )
    assert output.startswith(b"HTTP/1.1 413 ")
    assert b'"REQUEST_INVALID"' in output


def test_large_chunked_body_refused() -> None:
    chunk = b"x" * 8192
    raw = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw += b"%x\r\n%s\r\n" % (len(chunk), chunk) * (MAX_REQUEST_BODY // len(chunk) + 2)
    output, _ = _serve(raw)
    assert output.startswith(b"HTTP/1.1 413 ")
    assert b"got" not in output


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: nope\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nBad Header Line\r\n\r\n",
        b"GET\r\n\r\n",
    ],
)
def test_malformed_requests_get_an_oci_error(raw: bytes) -> None:
    """Twisted answers these through HTTPChannel._respondToBadRequestAndDisconnect, which
    ProxyChannel overrides (no public hook exists): if Twisted changes, this fails."""
    output, _ = _serve(raw)
    assert output.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    body = output.partition(b"\r\n\r\n")[2]
    assert json.loads(body)["errors"][0]["code"] == "REQUEST_INVALID"


def test_answers_after_the_client_left_are_dropped() -> None:
    from twisted.web.server import Request

    from regproxy.protocol.errors import OCIError
    from regproxy.web.respond import write_error

    request = Request(DummyChannel(), False)
    request.method = b"GET"
    request.connectionLost(Exception("gone"))
    write_error(request, OCIError("NOT_FOUND", "not found"))
    assert not request.finished and request.code == 200


def test_the_public_base_is_derived_once_per_request() -> None:
    """It is asked for while mapping and again while rewriting the answer; the second time
    costs nothing (the TLS check behind ``isSecure`` is an interface adaptation)."""
    request = DummyRequest([b""])
    request.requestHeaders.setRawHeaders(b"host", [b"r.example.com"])
    checks: list[bool] = []
    request.isSecure = lambda: checks.append(True) or False  # type: ignore[method-assign]
    assert public_base(request, CONFIG) == "http://r.example.com"  # type: ignore[arg-type]
    assert public_base(request, CONFIG) == "http://r.example.com"  # type: ignore[arg-type]
    assert len(checks) == 1
    other = DummyRequest([b""])
    other.requestHeaders.setRawHeaders(b"host", [b"s.example.com"])
    other.isSecure = lambda: True  # type: ignore[method-assign]
    assert public_base(other, CONFIG) == "https://s.example.com"  # type: ignore[arg-type]


class Held(Resource):
    """Answers when the test says so: a request that takes long to answer."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []

    def render(self, request):  # type: ignore[no-untyped-def]
        self.waiting.append(request)
        return NOT_DONE_YET


def _channel(resource: Resource, timeout: float = 5) -> tuple[Any, StringTransport, Clock]:
    clock = Clock()
    site = ProxySite(
        resource, metrics=Metrics(), client_address=ClientAddress(()), idle_timeout=timeout
    )
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    channel.callLater = clock.callLater  # TimeoutMixin's public hook for its timers
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(transport)
    return channel, transport, clock


def test_a_request_trickling_in_byte_by_byte_is_answered_408_and_closed() -> None:
    """Each byte restarts Twisted's idle timer; the whole request still has a deadline."""
    channel, transport, clock = _channel(Echo())
    for byte in b"GET /x HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"y" * 20:
        channel.dataReceived(bytes([byte]))
        clock.advance(0.5)  # 10 s in all, never 5 s of silence
    output = transport.value()
    assert output.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b'"REQUEST_INVALID"' in output
    assert transport.disconnecting


def test_no_deadline_runs_while_a_request_is_answered_even_with_the_next_arriving() -> None:
    """A slow answer (a big blob) with the client's next request already on its way, and
    Twisted's overlap of a finished request and the pipelined next one: no 408 lands in
    the middle of an answer."""
    held = Held()
    channel, transport, clock = _channel(held)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(held.waiting) == 1
    channel.dataReceived(b"GET /c HTTP/1.1\r\n")  # more arrives while /a is answered
    clock.advance(30)
    assert b"HTTP/1.1 408" not in transport.value()
    held.waiting[0].write(b"a")
    held.waiting[0].finish()  # /b starts at once, before /a's watchers are told
    assert len(held.waiting) == 2
    clock.advance(30)
    assert b"HTTP/1.1 408" not in transport.value() and not transport.disconnecting
    held.waiting[1].finish()
    for byte in b"Host: a\r\nX-Slow: yyyy":  # /c goes on trickling: its deadline runs now
        channel.dataReceived(bytes([byte]))
        clock.advance(0.5)
    assert b"HTTP/1.1 408 " in transport.value()


def test_request_ids_are_sixteen_hex_digits_and_never_repeat() -> None:
    from regproxy.web.site import next_request_id

    ids = [next_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(one) == 16 and int(one, 16) >= 0 for one in ids)


def test_a_connection_asks_its_transport_for_its_address_once() -> None:
    """twisted.web asks the channel for its own address on every request: on a keep-alive
    connection that would be one getsockname() per request."""
    from regproxy.web.site import ProxyChannel

    class CountingTransport(StringTransport):
        asked = 0

        def getHost(self) -> Any:
            CountingTransport.asked += 1
            return super().getHost()

    channel = ProxyChannel()
    channel.transport = CountingTransport()
    first, second = channel.getHost(), channel.getHost()
    assert first is second and CountingTransport.asked == 1
