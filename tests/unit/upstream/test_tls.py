"""TLS to upstreams (regproxy.upstream._tls) against a real Twisted TLS server on loopback.

Verification (the operator's CA, the host name, the platform's trust alone), the TLS
failure kind a bad certificate gets, plaintext of one socket read going up in one piece,
and how a connection's end is reported (with and without the server's close_notify).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from regproxy.upstream._tls import TLSEndpoint, tls_context
from regproxy.upstream.client import FailureKind, UpstreamClient, UpstreamFailure
from regproxy.upstream.treq_client import make_client, make_pool
from tests.support.tls import make_ca_and_cert

BODY = bytes(range(256)) * 4096  # 1 MiB: 64 records of 16 KiB


class Answer(Protocol):
    """Answers the first request with BODY, then closes cleanly or drops the socket."""

    abrupt = False

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY)
        self.transport.write(head + BODY)  # type: ignore[union-attr]
        if self.abrupt:
            # The TCP connection ends with no TLS close_notify: the transport under TLS.
            self.transport.transport.loseConnection()  # type: ignore[union-attr]


class Abrupt(Answer):
    abrupt = True


class Reader(Protocol):
    def __init__(self) -> None:
        self.reads: list[int] = []
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        # (bytes, fired once that many arrived): waiting on the condition itself.
        self._awaited: list[tuple[int, Deferred[None]]] = []

    def received(self, count: int) -> Deferred[None]:
        """Fires once ``count`` bytes arrived in all."""
        waiting: Deferred[None] = Deferred()
        self._awaited.append((count, waiting))
        self._check()
        return waiting

    def _check(self) -> None:
        total = sum(self.reads)
        for entry in [e for e in self._awaited if e[0] <= total]:
            self._awaited.remove(entry)
            entry[1].callback(None)

    def connectionMade(self) -> None:
        self.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(len(data))
        self._check()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.reason = reason
        self.ended.callback(None)


class TLSUpstreamTests(TestCase):
    def setUp(self) -> None:
        self.files = make_ca_and_cert(Path(self.mktemp()))

    def listen(self, protocol: type[Protocol]) -> int:
        endpoint = serverFromString(
            reactor,
            f"ssl:0:interface=127.0.0.1:privateKey={self.files.key}:certKey={self.files.cert}",
        )
        listening = endpoint.listen(Factory.forProtocol(protocol))
        port: Any = self.successResultOf(listening) if listening.called else None
        if port is None:  # pragma: no cover - listen is synchronous for ssl: endpoints
            raise RuntimeError("not listening")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def read_all(self, port: int, context: ssl.SSLContext, name: str) -> Reader:
        reader = Reader()
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        factory = Factory.forProtocol(lambda: reader)
        protocol = await TLSEndpoint(context, name, tcp).connect(factory)
        self.assertIs(protocol, reader)
        await reader.ended
        return reader

    async def test_the_operators_ca_verifies_and_records_go_up_joined(self) -> None:
        port = self.listen(Answer)
        reader = Reader()
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        context = tls_context(str(self.files.ca_cert))
        await TLSEndpoint(context, "127.0.0.1", tcp).connect(Factory.forProtocol(lambda: reader))
        await reader.received(len(BODY))
        # Every 16 KiB record on its own would be 64 reads or more; joined per socket read,
        # there are far fewer (how many depends on how the kernel splits the stream).
        self.assertLess(len(reader.reads), 48)
        self.assertGreater(max(reader.reads), 16 * 1024)
        reader.transport.loseConnection()  # type: ignore[union-attr]
        await reader.ended
        assert reader.reason is not None
        self.assertTrue(reader.reason.check(ConnectionDone, ConnectionLost))

    async def test_an_end_without_close_notify_is_a_lost_connection(self) -> None:
        port = self.listen(Abrupt)
        reader = await self.read_all(port, tls_context(str(self.files.ca_cert)), "localhost")
        reason = reader.reason
        assert reason is not None
        self.assertTrue(reason.check(ConnectionLost))
        self.assertFalse(reason.check(ConnectionDone))

    async def test_without_the_ca_the_certificate_does_not_verify(self) -> None:
        port = self.listen(Answer)
        reader = await self.read_all(port, tls_context(None), "127.0.0.1")
        reason = reader.reason
        assert reason is not None
        self.assertTrue(reason.check(ssl.SSLCertVerificationError))
        self.assertEqual(reader.reads, [])

    async def test_a_name_the_certificate_does_not_hold_does_not_verify(self) -> None:
        port = self.listen(Answer)
        context = tls_context(str(self.files.ca_cert))
        reader = await self.read_all(port, context, "registry.example")
        reason = reader.reason
        assert reason is not None
        self.assertTrue(reason.check(ssl.SSLCertVerificationError))
        self.assertEqual(reader.reads, [])

    async def test_a_certificate_failure_is_the_tls_kind_through_the_upstream_client(
        self,
    ) -> None:
        port = self.listen(Answer)
        pool = make_pool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        upstream = UpstreamClient(
            make_client(reactor, pool=pool, connect_timeout=5),  # no operator CA
            clock=reactor,
            timeout=10,
            idle_timeout=5,
        )
        with self.assertRaises(UpstreamFailure) as raised:
            await ensureDeferred(
                upstream.send("GET", f"https://127.0.0.1:{port}/v2/", headers=Headers(), route="r")
            )
        self.assertIs(raised.exception.kind, FailureKind.TLS)

    def test_a_ca_file_without_a_certificate_is_refused_at_start(self) -> None:
        empty = Path(self.mktemp())
        empty.write_text("not a certificate\n")
        with self.assertRaises(ValueError):
            tls_context(str(empty))

    def test_verification_is_on_and_tls_1_2_the_least(self) -> None:
        context = tls_context(None)
        self.assertEqual(context.verify_mode, ssl.CERT_REQUIRED)
        self.assertTrue(context.check_hostname)
        self.assertGreaterEqual(context.minimum_version, ssl.TLSVersion.TLSv1_2)


class Hello(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"hello")  # type: ignore[union-attr]


class Greeted(Protocol):
    def __init__(self) -> None:
        self.greeted: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"hi")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if not self.greeted.called:
            self.greeted.callback(None)


class ResumptionTests(TestCase):
    async def test_a_second_connection_resumes_the_first_ones_session(self) -> None:
        from twisted.internet.endpoints import TCP4ServerEndpoint

        from regproxy.server.listen_tls import (
            CertificateFiles,
            TLSOver,
            server_context,
            stdlib_tls,
        )

        files = make_ca_and_cert(Path(self.mktemp()))
        context = server_context(CertificateFiles(str(files.key), str(files.cert)))
        listening = TLSOver(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), stdlib_tls(context)
        )
        port = await listening.listen(Factory.forProtocol(Hello))
        self.addCleanup(port.stopListening)
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, timeout=5)
        endpoint = TLSEndpoint(tls_context(str(files.ca_cert)), "127.0.0.1", tcp)
        reused = []
        for _ in range(2):
            client = await endpoint.connect(Factory.forProtocol(Greeted))
            await client.greeted
            reused.append(client.transport.session_reused)
            client.transport.loseConnection()
        self.assertEqual(reused, [False, True])
        self.assertIsNotNone(endpoint.session)
