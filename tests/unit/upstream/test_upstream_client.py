"""The one upstream client against Twisted's real HTTP client on loopback: failures are
classified by type (a timeout is a 504, a refused connection, a TLS failure ...), and a
caller that cancels (its client left) is told so, never as an upstream error."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from regproxy.upstream.client import FailureKind, UpstreamClient, UpstreamFailure
from regproxy.upstream.treq_client import make_client, make_pool
from tests.support.ports import free_port


class Silent(Protocol):
    """Reads the request and never answers."""


class Recorder:
    def __init__(self) -> None:
        self.failures: list[tuple[str, FailureKind]] = []
        self.successes: list[str] = []

    def failed(self, route: str, kind: FailureKind, cause: str) -> None:
        self.failures.append((route, kind))

    def succeeded(self, route: str) -> None:
        self.successes.append(route)


class LoopbackClientTests(TestCase):
    def setUp(self) -> None:
        self.pool = make_pool(reactor)
        self.addCleanup(self.pool.closeCachedConnections)
        self.health = Recorder()
        self.upstream = self.make_upstream(timeout=10)

    def make_upstream(self, timeout: float) -> UpstreamClient:
        return UpstreamClient(
            make_client(reactor, pool=self.pool, connect_timeout=5),
            clock=reactor,
            timeout=timeout,
            idle_timeout=5,
            health=self.health,
        )

    def listen(self, protocol: type[Protocol]) -> int:
        port = reactor.listenTCP(0, Factory.forProtocol(protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def send(self, url: str) -> Any:
        return ensureDeferred(self.upstream.send("GET", url, headers=Headers(), route="r"))

    async def test_no_answer_in_time_is_a_timeout_504(self) -> None:
        self.upstream = self.make_upstream(timeout=0.3)
        port = self.listen(Silent)
        with self.assertRaises(UpstreamFailure) as raised:
            await self.send(f"http://127.0.0.1:{port}/v2/")
        self.assertIs(raised.exception.kind, FailureKind.TIMEOUT)
        self.assertEqual(raised.exception.oci().status, 504)
        self.assertEqual(raised.exception.oci().code, "UPSTREAM_TIMEOUT")
        self.assertEqual(self.health.failures, [("r", FailureKind.TIMEOUT)])

    async def test_a_caller_that_cancels_is_not_an_upstream_failure(self) -> None:
        port = self.listen(Silent)
        sending = self.send(f"http://127.0.0.1:{port}/v2/")
        reactor.callLater(0.05, sending.cancel)
        with self.assertRaises(CancelledError):
            await sending
        self.assertEqual(self.health.failures, [])

    async def test_a_refused_connection_is_connect_502(self) -> None:
        with self.assertRaises(UpstreamFailure) as raised:
            await self.send(f"http://127.0.0.1:{free_port()}/v2/")
        self.assertIs(raised.exception.kind, FailureKind.CONNECT)
        self.assertEqual(raised.exception.oci().status, 502)

    async def test_tls_to_a_plain_http_server_is_a_tls_failure(self) -> None:
        class PlainHTTP(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]

        port = self.listen(PlainHTTP)
        with self.assertRaises(UpstreamFailure) as raised:
            await self.send(f"https://127.0.0.1:{port}/v2/")
        self.assertIs(raised.exception.kind, FailureKind.TLS)
        self.assertEqual(raised.exception.oci().status, 502)

    async def test_a_connection_closed_before_an_answer_is_protocol(self) -> None:
        class Hangup(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.loseConnection()  # type: ignore[union-attr]

        port = self.listen(Hangup)
        with self.assertRaises(UpstreamFailure) as raised:
            await self.send(f"http://127.0.0.1:{port}/v2/")
        self.assertIs(raised.exception.kind, FailureKind.PROTOCOL)

    async def test_an_answer_is_a_success(self) -> None:
        class Answers(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # type: ignore[union-attr]

        port = self.listen(Answers)
        response, body = await ensureDeferred(
            self.upstream.fetch(
                "GET", f"http://127.0.0.1:{port}/v2/", headers=Headers(), route="r", limit=10
            )
        )
        self.assertEqual((response.code, body), (200, b"ok"))
        self.assertEqual(self.health.successes, ["r"])
