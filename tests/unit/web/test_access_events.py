"""The access event tells the truth: a transfer the upstream broke off is logged with the
status that was sent and the failure's kind, not as a client that closed (499); bytes that
arrive after a refusal are dropped without a traceback."""

from __future__ import annotations

from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from regproxy.config import Config, Route, Upstream
from regproxy.web.observe import ClientAddress, Metrics
from regproxy.web.site import ProxySite
from tests.support.inmemory import DIGEST, build_tree
from tests.support.stalling import Stalling


class SiteCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def serve(self, root: Resource) -> tuple[Any, StringTransport]:
        site = ProxySite(root, metrics=Metrics(), client_address=ClientAddress(()))
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
        channel.makeConnection(transport)
        return channel, transport

    def access_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_namespace") == "regproxy.access"]

    def errors_logged(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_failure") is not None]


class UpstreamBrokeOffTests(SiteCase):
    def test_a_body_broken_upstream_is_logged_with_the_status_sent(self) -> None:
        upstream = Stalling(hang_up=True)
        agent = RequestTraversalAgent(upstream)
        config = Config(routes=(Route(Upstream("https", "upstream.example")),))
        channel, transport = self.serve(build_tree(config, agent, Clock()))
        channel.dataReceived(
            f"GET /v2/app/blobs/{DIGEST} HTTP/1.1\r\nHost: r.example\r\n\r\n".encode()
        )
        for _ in range(5):
            agent.flush()
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        # The proxy cut the client off (it must not take 40 of 100 bytes for a whole body).
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(Failure(ConnectionDone()))
        [event] = self.access_events()
        self.assertEqual((event["status"], event["error_kind"]), (200, "body"))
        self.assertFalse(event["complete"])
        self.assertEqual(self.errors_logged(), [])


class RefusedBodyTests(SiteCase):
    def test_bytes_after_a_413_are_dropped_quietly(self) -> None:
        channel, transport = self.serve(Resource())
        channel.dataReceived(
            b"POST /_token HTTP/1.1\r\nHost: r\r\nContent-Length: 10000000\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
        )
        # Well under the limit: without the guard these reach a body file never opened.
        channel.dataReceived(b"x" * 100)
        channel.dataReceived(b"y" * 100)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.errors_logged(), [])
