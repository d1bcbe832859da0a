"""Follow mode is no SSRF: redirect targets are checked after resolution and before any
connection, and the connection goes to the address that was checked.

Everything here runs on a MemoryReactor with an injected resolver: no packet is sent
anywhere, and each test asserts that no connection was even attempted.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, Agent

from regproxy.config import BlobRedirects, Config, Route, Upstream
from regproxy.upstream._tls import tls_context
from regproxy.upstream.client import RedirectRefused
from regproxy.upstream.redirects import GuardedEndpoints, address_kind, check_scheme
from tests.support.inmemory import DIGEST, Answer, ProxyCase, build_tree, in_memory_client

UPSTREAM = Upstream("https", "registry.example")


class Resolver:
    """Answers from a table and records every lookup."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def __call__(self, host: str, port: int) -> Deferred[list[str]]:
        self.asked.append(host)
        return succeed(self.table.get(host, []))


def guarded(resolver: Resolver, upstream: Upstream = UPSTREAM) -> tuple[Any, GuardedEndpoints]:
    reactor = MemoryReactorClock()
    endpoints = GuardedEndpoints(reactor, upstream=upstream, tls=tls_context(), resolve=resolver)
    return reactor, endpoints


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("169.254.169.254", "link-local"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("172.16.5.4", "private"),
        ("fd00::1", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "private"),  # carrier-grade NAT is not the internet either
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
    ],
)
def test_address_kinds(address: str, kind: str | None) -> None:
    assert address_kind(ipaddress.ip_address(address)) == kind


def test_scheme_is_https_only_from_an_https_upstream() -> None:
    check_scheme(UPSTREAM, "https://storage.example/blob")
    with pytest.raises(RedirectRefused):
        check_scheme(UPSTREAM, "http://storage.example/blob")
    with pytest.raises(RedirectRefused):
        check_scheme(UPSTREAM, "ftp://storage.example/blob")
    check_scheme(Upstream("http", "127.0.0.1:5000"), "http://127.0.0.1:5001/blob")


class GuardedEndpointTests(SynchronousTestCase):
    def connect(self, url: str, resolver: Resolver, upstream: Upstream = UPSTREAM) -> Any:
        self.reactor, endpoints = guarded(resolver, upstream)
        endpoint = endpoints.endpointForURI(URI.fromBytes(url.encode()))
        return endpoint.connect(Factory.forProtocol(Protocol))

    def test_the_metadata_address_is_refused_before_any_connection(self) -> None:
        resolver = Resolver(
            {"metadata.google.internal": ["169.254.169.254"], "registry.example": ["203.0.113.9"]}
        )
        failure = self.failureResultOf(
            self.connect("https://metadata.google.internal/computeMetadata/v1/", resolver),
            RedirectRefused,
        )
        self.assertIn("link-local", str(failure.value))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_any_private_answer_refuses_the_host(self) -> None:
        # A name answering one public and one private address is refused whole.
        resolver = Resolver(
            {"storage.example": ["93.184.216.34", "10.0.0.7"], "registry.example": ["1.2.3.4"]}
        )
        self.failureResultOf(self.connect("https://storage.example/b", resolver), RedirectRefused)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_a_name_that_does_not_resolve_is_refused(self) -> None:
        resolver = Resolver({"registry.example": ["1.2.3.4"]})
        self.failureResultOf(self.connect("https://nowhere.example/b", resolver), RedirectRefused)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_plain_http_from_an_https_upstream_is_refused_before_resolving(self) -> None:
        resolver = Resolver({"storage.example": ["93.184.216.34"]})
        with self.assertRaises(RedirectRefused):
            guarded(resolver)[1].endpointForURI(URI.fromBytes(b"http://storage.example/b"))
        self.assertEqual(resolver.asked, [])

    def test_a_public_target_is_connected_at_the_checked_address(self) -> None:
        resolver = Resolver(
            {"storage.example": ["93.184.216.34"], "registry.example": ["203.0.113.9"]}
        )
        self.connect("https://storage.example/blob", resolver)
        [(host, port, *_)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("93.184.216.34", 443))

    def test_loopback_is_allowed_when_the_upstream_itself_is_on_loopback(self) -> None:
        upstream = Upstream("http", "127.0.0.1:5000")
        resolver = Resolver({"127.0.0.1": ["127.0.0.1"]})
        self.connect("http://127.0.0.1:5001/blob", resolver, upstream)
        [(host, port, *_)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 5001))

    def test_link_local_is_refused_even_from_a_loopback_upstream(self) -> None:
        upstream = Upstream("http", "127.0.0.1:5000")
        resolver = Resolver({"127.0.0.1": ["127.0.0.1"], "169.254.169.254": ["169.254.169.254"]})
        self.failureResultOf(
            self.connect("http://169.254.169.254/latest/meta-data/", resolver, upstream),
            RedirectRefused,
        )
        self.assertEqual(self.reactor.tcpClients, [])


class FollowRefusalTests(ProxyCase):
    """Through the whole tree: a refused redirect is a 502 naming why."""

    route = Route(
        Upstream("https", "upstream.example"), prefix="proj", blob_redirects=BlobRedirects.FOLLOW
    )

    def make_proxy(self, agent: Any, **config: Any) -> None:
        self.resolver = Resolver(
            {"upstream.example": ["203.0.113.9"], "metadata.internal": ["169.254.169.254"]}
        )
        self.memory_reactor, endpoints = guarded(self.resolver, self.route.upstream)
        follow = in_memory_client(Agent.usingEndpointFactory(self.memory_reactor, endpoints))
        self.config = Config(routes=(self.route,), **config)
        self.proxy = StubTreq(build_tree(self.config, agent, self.clock, follow_client=follow))

    def test_redirect_to_the_metadata_address_is_a_502(self) -> None:
        self.registry.on(
            f"/v2/proj/app/blobs/{DIGEST}",
            Answer(307, {b"location": [b"https://metadata.internal/computeMetadata/v1/"]}),
        )
        error = self.assert_oci_error(
            self.get(f"/v2/app/blobs/{DIGEST}"), 502, "UPSTREAM_UNAVAILABLE"
        )
        self.assertIn("link-local", error["detail"]["reason"])
        self.assertEqual(self.memory_reactor.tcpClients, [])

    def test_redirect_to_plain_http_is_a_502(self) -> None:
        self.registry.on(
            f"/v2/proj/app/blobs/{DIGEST}",
            Answer(302, {b"location": [b"http://storage.example/blob"]}),
        )
        error = self.assert_oci_error(
            self.get(f"/v2/app/blobs/{DIGEST}"), 502, "UPSTREAM_UNAVAILABLE"
        )
        self.assertIn("scheme", error["detail"]["reason"])
        self.assertEqual(self.resolver.asked, [])
        self.assertEqual(self.memory_reactor.tcpClients, [])
