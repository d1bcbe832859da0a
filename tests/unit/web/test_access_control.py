"""Access control through the whole resource tree, in memory: the challenge, the token
service, admission on every request, credentials kept from the upstream, the access log's
``user``, /metrics, and rate limits at the web layer."""

from __future__ import annotations

import base64
import json
from typing import Any

import attrs
from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from regproxy.config import Config, LimitsConfig, RateLimit
from regproxy.service import build_root
from regproxy.web.health import Readiness
from regproxy.web.observe import ClientAddress, Metrics
from regproxy.web.site import ProxySite
from tests.support.inmemory import (
    JSON_HEADERS,
    MANIFEST,
    OCI_MANIFEST,
    Answer,
    FailingAgent,
    FakeRegistry,
    build_tree,
    in_memory_client,
)
from tests.unit.access.gates import PASSWORDS, at_once, auth, make_gates, route

ROUTE = route()
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
MANIFEST_ANSWER = Answer(
    200,
    {b"content-type": [OCI_MANIFEST.encode()], b"docker-content-digest": [b"sha256:" + b"0" * 64]},
    MANIFEST,
)


@attrs.frozen
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@attrs.frozen
class Verdict:
    allowed: bool
    remaining: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        found = [
            (b"ratelimit-limit", b"2;w=60"),
            (b"ratelimit-remaining", b"%d;w=60" % self.remaining),
        ]
        if not self.allowed:
            found.append((b"retry-after", b"60"))
        return found


class CountingLimiter:
    def __init__(self, count: int) -> None:
        self.count = count
        self.taken: list[tuple[str, RateLimit]] = []

    def take(self, key: str, limit: RateLimit) -> Deferred[Verdict]:
        self.taken.append((key, limit))
        used = sum(1 for k, _ in self.taken if k == key)
        return succeed(Verdict(used <= self.count, max(self.count - used, 0)))


class AccessCase(SynchronousTestCase):
    peer = "127.0.0.1"
    trusted: tuple[str, ...] = ()
    limits: LimitsConfig | None = None

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.registry = FakeRegistry()
        self.registry.on("/v2/team-a/app/manifests/v1", MANIFEST_ANSWER)
        self.registry.on("/v2/public/x/manifests/v1", MANIFEST_ANSWER)
        self.agent = RequestTraversalAgent(self.registry)
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.limiter = CountingLimiter(2)
        self.counted: list[str] = []
        self.metrics = Metrics()
        config = Config(routes=(ROUTE,), auth=auth(), limits=self.limits)
        gates = make_gates(
            self.clock.seconds, limiter_for=lambda limits: self.limiter, counted=self.counted
        )
        root = build_tree(config, self.agent, self.clock, gates=gates)
        self.site = ProxySite(
            root, metrics=self.metrics, client_address=ClientAddress(self.trusted)
        )

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> Reply:
        kind = IPv6Address if ":" in self.peer else IPv4Address
        address = kind("TCP", self.peer, 4321)
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        lines = [f"{method} {path} HTTP/1.1", "Host: proxy.example", "Connection: close"]
        pairs = headers.items() if isinstance(headers, dict) else headers or []
        lines += [f"{k}: {v}" for k, v in pairs]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        for _ in range(10):
            self.agent.flush()
        head, _, content = transport.value().partition(b"\r\n\r\n")
        status_line, *header_lines = head.split(b"\r\n")
        found = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            found[name.strip().lower()] = value.strip()
        return Reply(int(status_line.split()[1]), found, content)

    def token(self, *scopes: str, credentials: str | None = None) -> str:
        query = "&".join(f"scope=repository:{s}:pull" for s in scopes)
        headers = {"Authorization": credentials} if credentials else {}
        reply = self.request("GET", f"/_token?service=proxy.example&{query}", headers)
        assert reply.status == 200, reply
        return str(reply.json()["token"])

    def access_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_namespace") == "regproxy.access"]


class ChallengeAndTokenTests(AccessCase):
    def test_the_ping_is_the_proxys_own_challenge(self) -> None:
        reply = self.request("GET", "/v2/")
        self.assertEqual(reply.status, 401)
        self.assertEqual(
            reply.headers[b"www-authenticate"],
            b'Bearer realm="http://proxy.example/_token",service="proxy.example"',
        )
        self.assertEqual(self.registry.seen, [])

    def test_a_token_opens_the_ping(self) -> None:
        token = self.token(credentials=basic("alice", PASSWORDS["alice"]))
        reply = self.request("GET", "/v2/", {"Authorization": f"Bearer {token}"})
        self.assertEqual((reply.status, reply.body), (200, b"{}"))

    def test_a_user_pulls_with_a_token_and_the_upstream_never_sees_it(self) -> None:
        token = self.token("team-a/app", credentials=basic("alice", PASSWORDS["alice"]))
        reply = self.request(
            "GET", "/v2/team-a/app/manifests/v1", {"Authorization": f"Bearer {token}"}
        )
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, MANIFEST)
        [seen] = self.registry.seen
        self.assertIsNone(seen.headers.getRawHeaders(b"authorization"))
        [event] = [e for e in self.access_events() if e["path"].startswith("/v2/team-a")]
        self.assertEqual(event["user"], "alice")
        self.assertIn(" user=alice", formatEvent(event))

    def test_a_token_post_with_the_password_grant(self) -> None:
        form = (
            f"grant_type=password&username=alice&password={PASSWORDS['alice']}"
            "&service=proxy.example&scope=repository:team-a/app:pull&client_id=docker"
            "&access_type=offline"
        )
        reply = self.request(
            "POST", "/_token", {"Content-Type": "application/x-www-form-urlencoded"}, form.encode()
        )
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.headers[b"cache-control"], b"no-store")
        answer = reply.json()
        self.assertEqual(
            set(answer), {"token", "access_token", "expires_in", "issued_at", "refresh_token"}
        )

    def test_no_credentials_is_a_401_with_the_scope(self) -> None:
        reply = self.request("GET", "/v2/team-a/app/manifests/v1")
        self.assertEqual(reply.status, 401)
        self.assertIn(b'scope="repository:team-a/app:pull"', reply.headers[b"www-authenticate"])
        self.assertEqual(self.registry.seen, [])

    def test_anonymous_repositories_are_served_without_credentials(self) -> None:
        self.assertEqual(self.request("GET", "/v2/public/x/manifests/v1").status, 200)

    def test_credentials_the_rules_refuse_are_a_403(self) -> None:
        token = self.token("team-a/app", credentials=basic("carol", PASSWORDS["carol"]))
        reply = self.request(
            "GET", "/v2/team-a/app/manifests/v1", {"Authorization": f"Bearer {token}"}
        )
        self.assertEqual(reply.status, 403)
        self.assertEqual(reply.json()["errors"][0]["code"], "DENIED")
        self.assertEqual(self.registry.seen, [])

    def test_a_wrong_password_is_a_401_and_counted(self) -> None:
        reply = self.request(
            "GET",
            "/_token?scope=repository:team-a/app:pull",
            {"Authorization": basic("alice", "nope")},
        )
        self.assertEqual(reply.status, 401)
        self.assertEqual(self.counted, ["failed"])
        self.assertNotIn(b"nope", reply.body)

    def test_authentications_reach_metrics(self) -> None:
        """As the service wires it: the tree's own gates count into its Metrics."""
        root = build_root(
            Config(routes=(ROUTE,), auth=auth()),
            client=in_memory_client(self.agent),
            clock=self.clock,
            metrics=self.metrics,
            readiness=Readiness(),
            run_in_thread=at_once,
        )
        self.site = ProxySite(root, metrics=self.metrics, client_address=ClientAddress(()))
        self.token(credentials=basic("alice", PASSWORDS["alice"]))
        self.request("GET", "/_token", {"Authorization": basic("alice", "nope")})
        self.request("GET", "/_token", {"Authorization": basic("mallory", "nope")})
        sample = self.metrics.registry.get_sample_value
        self.assertEqual(sample("regproxy_authentications_total", {"result": "ok"}), 1.0)
        self.assertEqual(sample("regproxy_authentications_total", {"result": "failed"}), 2.0)

    def test_no_secret_reaches_the_log(self) -> None:
        token = self.token("team-a/app", credentials=basic("alice", PASSWORDS["alice"]))
        self.request("GET", "/v2/team-a/app/manifests/v1", {"Authorization": f"Bearer {token}"})
        self.request("GET", "/_token", {"Authorization": basic("alice", "Wr0ng-pass")})
        logged = repr(self.events) + "".join(formatEvent(e) for e in self.events)
        for secret in (token, PASSWORDS["alice"], "Wr0ng-pass", basic("alice", "Wr0ng-pass")):
            self.assertNotIn(secret, logged)


class PlainHTTPTests(AccessCase):
    peer = "192.0.2.10"

    def test_credentials_from_afar_over_plain_http_are_refused(self) -> None:
        reply = self.request(
            "GET", "/_token", {"Authorization": basic("alice", PASSWORDS["alice"])}
        )
        self.assertEqual(reply.status, 403)
        self.assertIn(b"--insecure-auth", reply.body)

    def test_anonymous_tokens_are_fine(self) -> None:
        self.token("public/x")

    def test_an_untrusted_peer_saying_https_is_not_believed(self) -> None:
        headers = {
            "Authorization": basic("alice", PASSWORDS["alice"]),
            "X-Forwarded-Proto": "https",
        }
        reply = self.request("GET", "/_token", headers)
        self.assertEqual(reply.status, 403)
        self.assertIn(b"--insecure-auth", reply.body)
        self.assertEqual(self.counted, ["plain_http"])

    def refresh_token(self) -> str:
        """One got over loopback, as a client on the proxy's host would."""
        self.peer, peer = "127.0.0.1", self.peer
        form = f"grant_type=password&username=alice&password={PASSWORDS['alice']}"
        reply = self.request("POST", "/_token", FORM, (form + "&access_type=offline").encode())
        self.peer = peer
        self.counted.clear()
        return str(reply.json()["refresh_token"])

    def test_the_refresh_token_grant_over_plain_http_is_refused(self) -> None:
        form = f"grant_type=refresh_token&refresh_token={self.refresh_token()}"
        form += "&scope=repository:team-a/app:pull"
        reply = self.request("POST", "/_token", FORM, form.encode())
        self.assertEqual(reply.status, 403)
        self.assertIn(b"--insecure-auth", reply.body)
        self.assertEqual(self.counted, ["plain_http"])

    def test_a_bearer_token_over_plain_http_opens_nothing(self) -> None:
        self.peer, peer = "127.0.0.1", self.peer
        token = self.token("team-a/app", credentials=basic("alice", PASSWORDS["alice"]))
        self.peer = peer
        self.counted.clear()
        for bearer in (token, self.refresh_token()):
            reply = self.request(
                "GET", "/v2/team-a/app/manifests/v1", {"Authorization": f"Bearer {bearer}"}
            )
            self.assertIn(reply.status, (401, 403))
        access = self.request("GET", "/v2/", {"Authorization": f"Bearer {token}"})
        self.assertEqual(access.status, 403)
        # The access token: refused for the channel; the refresh token: no access token.
        self.assertEqual(self.counted, ["plain_http", "invalid_token", "plain_http"])
        self.assertEqual(self.registry.seen, [])


class TrustedProxyTests(AccessCase):
    peer = "10.0.0.5"
    trusted = ("10.0.0.0/8",)

    def test_a_trusted_proxy_saying_https_may_carry_credentials(self) -> None:
        headers = {
            "Authorization": basic("alice", PASSWORDS["alice"]),
            "X-Forwarded-Proto": "https",
        }
        self.assertEqual(self.request("GET", "/_token", headers).status, 200)

    def test_a_trusted_proxy_saying_http_may_not(self) -> None:
        headers = {
            "Authorization": basic("alice", PASSWORDS["alice"]),
            "X-Forwarded-Proto": "http",
        }
        self.assertEqual(self.request("GET", "/_token", headers).status, 403)

    def test_the_proto_is_the_one_the_trusted_proxy_added_last(self) -> None:
        # A proxy that appends keeps what the client sent in front of its own value.
        credentials = ("Authorization", basic("alice", PASSWORDS["alice"]))
        for protos, status in (
            (["https, http"], 403),
            (["https", "http"], 403),
            (["https,http"], 403),
            (["http, https"], 200),
            (["http", "https"], 200),
            (["http", "x, https"], 200),
        ):
            headers = [credentials] + [("X-Forwarded-Proto", proto) for proto in protos]
            self.assertEqual(self.request("GET", "/_token", headers).status, status, protos)


class LoopbackProxyTests(AccessCase):
    """A trusted proxy on the proxy's own host: its requests are from afar, and only what it
    says of them counts, never that it is itself on loopback."""

    peer = "127.0.0.1"
    trusted = ("127.0.0.1/32",)

    def test_a_loopback_proxy_saying_http_or_nothing_may_not_carry_credentials(self) -> None:
        credentials = ("Authorization", basic("alice", PASSWORDS["alice"]))
        for said in ([("X-Forwarded-Proto", "http")], []):
            self.assertEqual(self.request("GET", "/_token", [credentials, *said]).status, 403)
        https = [credentials, ("X-Forwarded-Proto", "https")]
        self.assertEqual(self.request("GET", "/_token", https).status, 200)

    def test_an_untrusted_loopback_peer_is_safe_whatever_it_says(self) -> None:
        self.site.client_address = ClientAddress(())
        headers = {
            "Authorization": basic("alice", PASSWORDS["alice"]),
            "X-Forwarded-Proto": "http",
        }
        self.assertEqual(self.request("GET", "/_token", headers).status, 200)


class MappedLoopbackTests(AccessCase):
    """A dual-stack listener sees 127.0.0.1 as ::ffff:127.0.0.1."""

    peer = "::ffff:127.0.0.1"

    def test_ipv4_mapped_loopback_is_loopback(self) -> None:
        self.token("team-a/app", credentials=basic("alice", PASSWORDS["alice"]))


class MappedTrustedProxyTests(AccessCase):
    peer = "::ffff:10.0.0.5"
    trusted = ("10.0.0.0/8",)

    def test_an_ipv4_mapped_trusted_proxy_is_trusted(self) -> None:
        headers = {
            "Authorization": basic("alice", PASSWORDS["alice"]),
            "X-Forwarded-Proto": "https",
            "X-Forwarded-For": "198.51.100.4, ::ffff:10.0.0.6",
        }
        self.assertEqual(self.request("GET", "/_token", headers).status, 200)
        [event] = [e for e in self.access_events() if e["path"].startswith("/_token")]
        self.assertIn("198.51.100.4", formatEvent(event))


class RateLimitTests(AccessCase):
    limits = LimitsConfig(anonymous=RateLimit.parse("2/1m"), users=RateLimit.parse("2/1m"))

    def test_manifest_gets_are_counted_per_principal_and_the_third_is_refused(self) -> None:
        token = self.token("team-a/app", credentials=basic("alice", PASSWORDS["alice"]))
        auth = {"Authorization": f"Bearer {token}"}
        first = self.request("GET", "/v2/team-a/app/manifests/v1", auth)
        self.assertEqual(first.headers[b"ratelimit-remaining"], b"1;w=60")
        self.request("HEAD", "/v2/team-a/app/manifests/v1", auth)  # not counted
        self.request("GET", "/v2/team-a/app/manifests/v1", auth)
        third = self.request("GET", "/v2/team-a/app/manifests/v1", auth)
        self.assertEqual(third.status, 429)
        self.assertEqual(third.json()["errors"][0]["code"], "TOOMANYREQUESTS")
        self.assertEqual(third.headers[b"retry-after"], b"60")
        self.assertEqual([key for key, _ in self.limiter.taken], ["principal:alice"] * 3)
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "regproxy_rate_limited_total", {"route": "own"}
            ),
            1.0,
        )

    def test_an_error_answer_still_says_what_is_left_of_the_limit(self) -> None:
        # The request was counted: the client must see it, whatever went wrong after.
        unreachable = FailingAgent(ConnectionRefusedError())
        self.agent.request = unreachable.request  # type: ignore[method-assign]
        reply = self.request("GET", "/v2/public/x/manifests/v1")
        self.assertEqual(reply.status, 502)
        self.assertEqual(reply.headers[b"ratelimit-limit"], b"2;w=60")
        self.assertEqual(reply.headers[b"ratelimit-remaining"], b"1;w=60")

    def test_anonymous_clients_are_counted_by_address(self) -> None:
        self.request("GET", "/v2/public/x/manifests/v1")
        self.assertEqual([key for key, _ in self.limiter.taken], ["anonymous:127.0.0.1"])

    def test_anonymous_clients_are_counted_as_the_login_throttle_counts_them(self) -> None:
        # Anyone holds a whole IPv6 /64: counted by address, each of its addresses would
        # have a limit of its own.
        self.limiter.count = 1
        self.peer = "2001:db8::1"
        self.assertEqual(self.request("GET", "/v2/public/x/manifests/v1").status, 200)
        self.peer = "2001:db8::2"
        self.assertEqual(self.request("GET", "/v2/public/x/manifests/v1").status, 429)
        self.peer = "::ffff:127.0.0.1"
        self.request("GET", "/v2/public/x/manifests/v1")
        self.assertEqual(
            [key for key, _ in self.limiter.taken],
            ["anonymous:2001:db8::/64"] * 2 + ["anonymous:127.0.0.1"],
        )


class UpstreamTokenTests(AccessCase):
    """A route without credentials in front of a token-auth upstream: with [auth] the
    client's credentials are the proxy's own, so the proxy fetches the upstream's anonymous
    token itself, sending no credentials to the realm."""

    def setUp(self) -> None:
        super().setUp()
        challenge = b'Bearer realm="https://upstream.example/token",service="up"'

        def manifest(request: Any) -> Answer:
            if request.getHeader(b"authorization") == b"Bearer upstream-token":
                return MANIFEST_ANSWER
            return Answer(401, {b"www-authenticate": [challenge], **JSON_HEADERS}, b"{}")

        self.registry.on("/v2/team-a/app/manifests/v1", manifest)
        self.registry.on("/token", Answer(200, JSON_HEADERS, b'{"token":"upstream-token"}'))

    def test_the_proxy_does_the_anonymous_token_dance_upstream(self) -> None:
        token = self.token("team-a/app", credentials=basic("alice", PASSWORDS["alice"]))
        reply = self.request(
            "GET", "/v2/team-a/app/manifests/v1", {"Authorization": f"Bearer {token}"}
        )
        self.assertEqual((reply.status, reply.body), (200, MANIFEST))
        [asked] = [seen for seen in self.registry.seen if seen.path == "/token"]
        self.assertIsNone(asked.headers.getRawHeaders(b"authorization"))
        self.assertIn(("scope", "repository:team-a/app:pull"), asked.query)


class UpstreamBasicTests(AccessCase):
    def test_a_basic_challenge_upstream_is_not_answered_without_credentials(self) -> None:
        """The proxy holds no credentials for the route: it has nothing to answer Basic
        with (an empty Authorization would be a credential of sorts)."""
        challenge = {b"www-authenticate": [b'Basic realm="upstream"'], **JSON_HEADERS}
        self.registry.on("/v2/public/x/manifests/v1", Answer(401, challenge, b"{}"))
        reply = self.request("GET", "/v2/public/x/manifests/v1")
        self.assertEqual(reply.status, 401)
        [seen] = self.registry.seen
        self.assertIsNone(seen.headers.getRawHeaders(b"authorization"))
