"""The proxy's own upstream credentials: sources, challenge answers and the token cache.

The token realm is an in-memory twisted Resource (``FakeRegistry`` from test_forward, which
records every request) behind ``treq.testing.RequestTraversalAgent``; time is a ``Clock``.
Blocking Google refreshes go to an injected runner the tests drive themselves.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
from pathlib import Path
from typing import Any

import google.auth.exceptions
import google.auth.transport.requests
import pytest
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    ensureDeferred,
    succeed,
)
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from regproxy.config import Credentials, Route, Upstream
from regproxy.protocol.errors import OCIError
from regproxy.upstream.auth import (
    DEFAULT_TOKEN_LIFETIME,
    TOKEN_EXPIRY_MARGIN,
    CredentialsRejected,
    UpstreamAuth,
)
from regproxy.upstream.client import UpstreamClient
from regproxy.upstream.credentials import (
    GOOGLE_REFRESH_MARGIN,
    BasicCredentials,
    GoogleAccessTokens,
    StaticHeader,
    basic_header,
    credential_source,
)
from tests.support.inmemory import AUTH_REALM, Answer, FailingAgent, FakeRegistry

SECRET = "s3cret-pa55w0rd"
BASIC = b"Basic " + base64.b64encode(f"robot:{SECRET}".encode())
UPSTREAM = Upstream("https", "upstream.example")
ROUTE = Route(UPSTREAM, prefix="proj", credentials=Credentials(username="robot", password=SECRET))
STATIC_ROUTE = Route(
    UPSTREAM, credentials=Credentials(auth_header=f"Bearer {SECRET}"), name="static"
)
ANONYMOUS_ROUTE = Route(UPSTREAM, name="anonymous")
# The scope comes already prefixed from the forwarder; the challenge's own scope is ignored.
SCOPE = "repository:proj/team/app:pull"
BEARER = (
    b'Bearer realm="' + AUTH_REALM.encode() + b'",service="upstream.example",'
    b'scope="repository:team/app:pull"'
)
BASIC_CHALLENGE = b'Basic realm="upstream.example"'
TIMEOUT = 10.0


def token_answer(status: int = 200, **document: Any) -> Answer:
    return Answer(status, {b"content-type": [b"application/json"]}, json.dumps(document).encode())


class Realm(FakeRegistry):
    """The token service; it answers only when the test releases its held requests.

    RequestTraversalAgent answers a finished resource within ``request()``, which no real
    network does (and which UpstreamAuth mishandles: see test_realm_answering_at_once).
    """

    def __init__(self, *, hold: bool = True) -> None:
        super().__init__()
        self.hold = hold
        self.held: list[tuple[Request, bytes]] = []

    def render(self, request: Request) -> Any:
        body = super().render(request)
        if not self.hold:
            return body
        self.held.append((request, body))
        return NOT_DONE_YET

    def release(self) -> None:
        held, self.held = self.held, []
        for request, body in held:
            request.write(body)
            request.finish()


SYNCHRONOUS_FETCH = (
    "UpstreamAuth.answer starts the fetch before it registers its waiter: a fetch that "
    "ends at once (a non-http or malformed realm URL raises before any I/O) is delivered "
    "to nobody and the request waits forever instead of getting a 502"
)


@implementer(IAgent)
class LaterFailingAgent:
    """An agent whose requests fail when the test says so, as a refused connection does."""

    def __init__(self) -> None:
        self.pending: list[Deferred[Any]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None):  # type: ignore[no-untyped-def]
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d

    def fail(self, error: Exception) -> None:
        pending, self.pending = self.pending, []
        for d in pending:
            d.errback(error)


class AuthCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.realm = Realm()
        self.realm.on("/token", token_answer(token="tok-1", expires_in=300))
        self.agent = RequestTraversalAgent(self.realm)
        self.clock = Clock()
        self.fetches: list[tuple[str, str]] = []
        self.auth = self.make_auth(self.agent)
        self.log_events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.log_events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.log_events.append)
        self.delayed_before = len(global_reactor.getDelayedCalls())
        # treq arms its header timeout on the global reactor: it must be gone afterwards.
        self.addCleanup(
            lambda: self.assertEqual(len(global_reactor.getDelayedCalls()), self.delayed_before)
        )

    def make_auth(self, agent: Any) -> UpstreamAuth:
        sources = {
            route.name: source
            for route in (ROUTE, STATIC_ROUTE, ANONYMOUS_ROUTE)
            if (source := credential_source(route.credentials)) is not None
        }
        return UpstreamAuth(
            upstream=UpstreamClient(
                HTTPClient(agent), clock=self.clock, timeout=TIMEOUT, idle_timeout=TIMEOUT
            ),
            sources=sources,
            on_fetch=lambda route, outcome: self.fetches.append((route, outcome)),
        )

    @property
    def logged(self) -> list[str]:
        return [formatEvent(event) for event in self.log_events]

    auto_release = True

    def settle(self, d: Deferred[Any]) -> Deferred[Any]:
        """Let the realm answer (unless the test holds it) and the bytes flow."""
        for _ in range(10):
            if self.auto_release:
                self.realm.release()
            self.agent.flush()
        return d

    def answer(
        self, values: list[bytes] | None = None, route: Route = ROUTE, scope: str = SCOPE
    ) -> Deferred[bytes | None]:
        item = self.auth.plan(route, [BEARER] if values is None else values)
        if item is None:
            # Nothing the proxy may answer: the request goes on without its credentials.
            return succeed(None)
        return self.settle(ensureDeferred(self.auth.answer(route, scope, item)))

    def authorization(self, route: Route = ROUTE, scope: str = SCOPE) -> bytes | None:
        return self.successResultOf(
            self.settle(ensureDeferred(self.auth.authorization(route, scope)))
        )


class BearerTests(AuthCase):
    def test_token_fetched_with_service_scope_and_basic(self) -> None:
        self.assertEqual(self.successResultOf(self.answer()), b"Bearer tok-1")
        [seen] = self.realm.seen
        self.assertEqual(
            (seen.method, seen.host, seen.path), (b"GET", b"auth.upstream.example", "/token")
        )
        self.assertEqual(seen.query, [("service", "upstream.example"), ("scope", SCOPE)])
        self.assertEqual(seen.headers.getRawHeaders(b"authorization"), [BASIC])
        self.assertEqual(self.fetches, [("default", "ok")])

    def test_access_token_field(self) -> None:
        self.realm.on("/token", token_answer(access_token="oauth-tok", expires_in=300))
        self.assertEqual(self.successResultOf(self.answer()), b"Bearer oauth-tok")

    def test_token_wins_over_access_token(self) -> None:
        self.realm.on("/token", token_answer(token="tok", access_token="other"))
        self.assertEqual(self.successResultOf(self.answer()), b"Bearer tok")

    def test_realm_with_a_query_and_no_service(self) -> None:
        challenge = b'Bearer realm="https://auth.upstream.example/token?tenant=t1"'
        self.assertEqual(self.successResultOf(self.answer([challenge])), b"Bearer tok-1")
        [seen] = self.realm.seen
        self.assertEqual(seen.query, [("tenant", "t1"), ("scope", SCOPE)])

    def test_static_header_goes_to_the_realm(self) -> None:
        self.successResultOf(self.answer(route=STATIC_ROUTE))
        [seen] = self.realm.seen
        self.assertEqual(
            seen.headers.getRawHeaders(b"authorization"), [f"Bearer {SECRET}".encode()]
        )

    def test_realm_that_is_not_http_is_never_asked(self) -> None:
        challenge = b'Bearer realm="file:///etc/passwd",service="x"'
        self.assertIsNone(self.successResultOf(self.answer([challenge])))
        self.assertEqual(self.realm.seen, [])

    def test_siblings_on_shared_domains_are_other_tenants(self) -> None:
        from regproxy.upstream.realm import credential_may_go_to

        hub = Route(Upstream("https", "registry-1.docker.io"), credentials=ROUTE.credentials)
        assert credential_may_go_to(hub, "https://auth.docker.io/token")
        for upstream, realm in (
            ("mine.azurecr.io", "https://theirs.azurecr.io/oauth2/token"),
            ("mine.jfrog.io", "https://theirs.jfrog.io/token"),
            ("1.dkr.ecr.eu-west-1.amazonaws.com", "https://2.dkr.ecr.eu-west-1.amazonaws.com/"),
        ):
            route = Route(Upstream("https", upstream), credentials=ROUTE.credentials)
            assert not credential_may_go_to(route, realm), (upstream, realm)
            assert credential_may_go_to(route, f"https://{upstream}/token")

    def test_realm_on_a_foreign_host_gets_no_credentials(self) -> None:
        """Credentials go to the upstream's host, its subdomains and its siblings only."""
        for realm in (
            "https://evil.example/token",
            "https://upstream.example.evil.example/token",
            "http://auth.upstream.example/token",  # plain http from an https upstream
        ):
            challenge = f'Bearer realm="{realm}",service="x"'.encode()
            self.assertIsNone(self.successResultOf(self.answer([challenge])), realm)
        self.assertEqual(self.realm.seen, [])
        refused = [line for line in self.logged if "not sending the proxy's" in line]
        # Once per (route, host), not once per request.
        self.answer([b'Bearer realm="https://evil.example/other"'])
        self.assertEqual(
            len([line for line in self.logged if "not sending the proxy's" in line]),
            len(refused),
        )
        self.assertNotIn(SECRET, "\n".join(self.logged))

    def test_malformed_realm_url(self) -> None:
        # treq refuses the URL before any I/O (as it does with the real reactor).
        challenge = b'Bearer realm="https://auth.upstream.example:notaport/token"'
        failure = self.failureResultOf(self.answer([challenge]), OCIError)
        self.assertEqual(failure.value.code, "UPSTREAM_UNAVAILABLE")
        self.assertEqual(self.realm.seen, [])

    def test_realm_answering_at_once(self) -> None:
        self.realm.hold = False
        self.assertEqual(self.successResultOf(self.answer()), b"Bearer tok-1")

    def test_no_token_in_the_answer(self) -> None:
        for answer in (
            token_answer(expires_in=300),
            token_answer(token=""),
            token_answer(token=42),
            Answer(200, {}, b"not json"),
            Answer(200, {}, b"[1, 2]"),
            Answer(500, {}, b'{"token":"from-an-error"}'),
            Answer(302, {b"location": [b"https://elsewhere.example/token"]}, b""),
        ):
            self.realm.on("/token", answer)
            failure = self.failureResultOf(self.answer(), OCIError)
            self.assertEqual(failure.value.code, "UPSTREAM_UNAVAILABLE", answer)
            self.assertIsNone(self.authorization())
        self.assertEqual(self.fetches, [("default", "failed")] * 7)
        # The redirect was not followed: credentials go to the named realm only.
        self.assertEqual({seen.host for seen in self.realm.seen}, {b"auth.upstream.example"})

    def test_realm_unreachable(self) -> None:
        agent = LaterFailingAgent()
        self.auth = self.make_auth(agent)
        d = self.answer()
        self.assertNoResult(d)
        agent.fail(ConnectionRefusedError())
        failure = self.failureResultOf(d, OCIError)
        self.assertEqual((failure.value.code, failure.value.status), ("UPSTREAM_UNAVAILABLE", 502))
        self.assertEqual(self.fetches, [("default", "unreachable")])

    def test_realm_unreachable_at_once(self) -> None:
        self.auth = self.make_auth(FailingAgent(ConnectionRefusedError()))
        self.failureResultOf(self.answer(), OCIError)

    def test_challenge_without_bearer_or_basic(self) -> None:
        for values in ([b'Negotiate realm="x"'], [b"Bearer service=x"], [b""], []):
            self.assertIsNone(self.successResultOf(self.answer(values)))
        self.assertEqual(self.realm.seen, [])

    def test_realm_that_stalls_mid_body_times_out(self) -> None:
        stalled: list[Request] = []
        gone: list[bool] = []

        class Stalling(Realm):
            def render(self, request: Request) -> Any:
                stalled.append(request)
                request.notifyFinish().addBoth(lambda result: gone.append(result is not None))
                request.setHeader(b"content-length", b"100")
                request.write(b'{"token":"tok-')
                return NOT_DONE_YET

        self.realm = Stalling()
        self.agent = RequestTraversalAgent(self.realm)
        self.auth = self.make_auth(self.agent)
        first = self.answer()
        second = self.answer()
        self.assertEqual(len(stalled), 1)
        self.clock.pump([1.0] * int(TIMEOUT - 1))
        self.settle(first)
        self.assertNoResult(first)
        self.clock.pump([1.0] * 2)
        self.settle(first)
        for d in (first, second):
            self.assertIn(
                self.failureResultOf(d, OCIError).value.code,
                ("UPSTREAM_TIMEOUT", "UPSTREAM_UNAVAILABLE"),
            )
        self.assertEqual(gone, [True])  # the stalled transfer was stopped
        self.assertEqual(len(self.fetches), 1)
        # Nothing is left waiting on the dead fetch: the next challenge asks again.
        self.answer()
        self.assertEqual(len(stalled), 2)
        self.clock.advance(TIMEOUT)

    def test_oversized_token_answer(self) -> None:
        padding = "x" * (1024 * 1024)
        self.realm.on("/token", token_answer(token="tok-big", padding=padding))
        failure = self.failureResultOf(self.answer(), OCIError)
        self.assertEqual(failure.value.code, "UPSTREAM_UNAVAILABLE")
        self.assertIsNone(self.authorization())


class CacheTests(AuthCase):
    def test_cached_token_is_sent_without_a_fetch(self) -> None:
        self.assertIsNone(self.authorization())
        self.successResultOf(self.answer())
        self.assertEqual(self.authorization(), b"Bearer tok-1")
        self.assertEqual(self.authorization(), b"Bearer tok-1")
        self.assertEqual(len(self.realm.seen), 1)
        # Per scope: another repository has no token yet.
        self.assertIsNone(self.authorization(scope="repository:proj/other:pull"))

    def test_expiry_with_margin(self) -> None:
        for expires_in, valid_for in (
            (300, 300 - TOKEN_EXPIRY_MARGIN),
            (None, DEFAULT_TOKEN_LIFETIME - min(TOKEN_EXPIRY_MARGIN, DEFAULT_TOKEN_LIFETIME / 2)),
            (20, 10.0),  # short-lived: dropped at half-life
            (3600, 3570),
        ):
            document: dict[str, Any] = {"token": f"tok-{expires_in}"}
            if expires_in is not None:
                document["expires_in"] = expires_in
            self.realm.on("/token", token_answer(**document))
            header = f"Bearer tok-{expires_in}".encode()
            fetched = len(self.realm.seen)
            self.assertEqual(self.successResultOf(self.answer()), header)
            self.clock.advance(valid_for - 0.5)
            self.assertEqual(self.authorization(), header, expires_in)
            self.clock.advance(0.5)
            self.assertIsNone(self.authorization(), expires_in)
            self.assertEqual(len(self.realm.seen), fetched + 1)
        self.assertEqual(DEFAULT_TOKEN_LIFETIME, 60.0)

    def test_expired_token_is_fetched_again_on_the_next_challenge(self) -> None:
        self.successResultOf(self.answer())
        self.clock.advance(300)
        self.assertIsNone(self.authorization())
        self.realm.on("/token", token_answer(token="tok-2", expires_in=300))
        self.assertEqual(self.successResultOf(self.answer()), b"Bearer tok-2")
        self.assertEqual(len(self.realm.seen), 2)
        self.assertEqual(self.authorization(), b"Bearer tok-2")

    def test_a_new_challenge_replaces_a_cached_token(self) -> None:
        # The upstream refused the cached token (revoked): it is not sent again.
        self.successResultOf(self.answer())
        self.realm.on("/token", token_answer(token="tok-2", expires_in=300))
        self.assertEqual(self.successResultOf(self.answer()), b"Bearer tok-2")
        self.assertEqual(self.authorization(), b"Bearer tok-2")

    def test_failed_fetch_drops_the_cached_token(self) -> None:
        self.successResultOf(self.answer())
        self.realm.on("/token", Answer(500))
        self.failureResultOf(self.answer(), OCIError)
        self.assertIsNone(self.authorization())


class ConcurrencyTests(AuthCase):
    auto_release = False

    def test_concurrent_answers_share_one_fetch(self) -> None:
        first, second = self.answer(), self.answer()
        self.assertEqual(len(self.realm.seen), 1)
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.realm.release()
        self.settle(first)
        self.assertEqual(self.successResultOf(first), b"Bearer tok-1")
        self.assertEqual(self.successResultOf(second), b"Bearer tok-1")
        self.assertEqual(self.fetches, [("default", "ok")])
        self.assertEqual(self.authorization(), b"Bearer tok-1")

    def test_other_scopes_fetch_their_own(self) -> None:
        first = self.answer()
        second = self.answer(scope="repository:proj/other:pull")
        self.assertEqual(
            [seen.query[-1] for seen in self.realm.seen],
            [("scope", SCOPE), ("scope", "repository:proj/other:pull")],
        )
        self.realm.release()
        self.settle(first)
        self.successResultOf(first)
        self.successResultOf(second)

    def test_cancelling_one_waiter_leaves_the_other(self) -> None:
        first, second = self.answer(), self.answer()
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertNoResult(second)
        self.realm.release()
        self.settle(second)
        self.assertEqual(self.successResultOf(second), b"Bearer tok-1")
        self.assertEqual(len(self.realm.seen), 1)

    def test_fetch_outlives_all_its_waiters(self) -> None:
        first = self.answer()
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.realm.release()
        self.settle(first)
        # Nobody waits any more, but the token is kept for the next request.
        self.assertEqual(self.authorization(), b"Bearer tok-1")
        self.assertEqual(self.fetches, [("default", "ok")])

    def test_failure_reaches_every_waiter(self) -> None:
        self.realm.on("/token", token_answer(401, details="bad"))
        first, second, third = self.answer(), self.answer(), self.answer()
        third.cancel()
        self.realm.release()
        self.settle(first)
        self.failureResultOf(first, CredentialsRejected)
        self.failureResultOf(second, CredentialsRejected)
        self.failureResultOf(third, CancelledError)
        self.assertEqual(self.fetches, [("default", "rejected")])
        # The next challenge fetches again rather than joining a finished fetch.
        self.realm.on("/token", token_answer(token="tok-2"))
        again = self.answer()
        self.realm.release()
        self.settle(again)
        self.assertEqual(self.successResultOf(again), b"Bearer tok-2")


class RejectedTests(AuthCase):
    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def assert_no_secret_logged(self) -> None:
        secrets = (SECRET, BASIC.decode(), BASIC.split()[1].decode())
        for event in self.events:
            text = (formatEvent(event) or "") + repr(event)
            for secret in secrets:
                self.assertNotIn(secret, text)

    def test_realm_rejects_the_credentials(self) -> None:
        for status in (401, 403):
            self.fetches.clear()
            self.realm.on("/token", token_answer(status, details=f"bad password {SECRET}"))
            failure = self.failureResultOf(self.answer(), CredentialsRejected)
            error = failure.value
            self.assertIsInstance(error, OCIError)
            self.assertEqual((error.code, error.status), ("UNAUTHORIZED", 403))
            self.assertEqual(error.detail, {"route": "default"})
            self.assertNotIn(SECRET.encode(), error.body())
            self.assertNotIn(SECRET, repr(error))
            self.assertEqual(self.fetches, [("default", "rejected")])
        warnings = [
            formatEvent(event) for event in self.events if "rejected" in formatEvent(event)
        ]
        self.assertEqual(len(warnings), 2, [formatEvent(event) for event in self.events])
        self.assertIn("route default", warnings[0])
        self.assertIn("basic credentials of robot", warnings[0])
        self.assertIn("HTTP 401", warnings[0])
        self.assert_no_secret_logged()

    def test_static_header_rejected(self) -> None:
        self.realm.on("/token", token_answer(401))
        self.failureResultOf(self.answer(route=STATIC_ROUTE), CredentialsRejected)
        self.assertTrue(self.events)
        self.assert_no_secret_logged()


class BasicAndStaticTests(AuthCase):
    def test_basic_challenge(self) -> None:
        self.assertIsNone(self.authorization())
        self.assertEqual(self.successResultOf(self.answer([BASIC_CHALLENGE])), BASIC)
        self.assertEqual(self.realm.seen, [])
        # From then on Basic goes up front, for every scope of the route.
        self.assertEqual(self.authorization(), BASIC)
        self.assertEqual(self.authorization(scope="repository:proj/other:pull"), BASIC)
        self.assertIsNone(self.authorization(route=ANONYMOUS_ROUTE))

    def test_bearer_is_preferred_over_basic(self) -> None:
        values = [BASIC_CHALLENGE, BEARER]
        self.assertEqual(self.successResultOf(self.answer(values)), b"Bearer tok-1")
        self.assertIsNone(self.authorization(scope="repository:proj/other:pull"))

    def test_static_header_sent_on_the_first_try(self) -> None:
        self.assertEqual(self.authorization(route=STATIC_ROUTE), f"Bearer {SECRET}".encode())
        self.assertEqual(self.realm.seen, [])

    def test_static_header_answers_a_basic_challenge(self) -> None:
        result = self.successResultOf(self.answer([BASIC_CHALLENGE], route=STATIC_ROUTE))
        self.assertEqual(result, f"Bearer {SECRET}".encode())

    def test_no_credentials_for_the_route(self) -> None:
        self.assertFalse(self.auth.configured(ANONYMOUS_ROUTE))
        self.assertTrue(self.auth.configured(ROUTE))
        for values in ([BEARER], [BASIC_CHALLENGE]):
            self.assertIsNone(self.successResultOf(self.answer(values, route=ANONYMOUS_ROUTE)))
            self.assertIsNone(self.authorization(route=ANONYMOUS_ROUTE))
        self.assertEqual(self.realm.seen, [])
        self.assertEqual(self.fetches, [])


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "key.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "client_email": "robot@project.iam.gserviceaccount.com",
                "private_key": "-----BEGIN PRIVATE KEY-----\n"
                f"{SECRET}\n-----END PRIVATE KEY-----\n",
            }
        )
    )
    return str(path)


def _header(source: Any) -> bytes:
    d = ensureDeferred(source.authorization())
    assert d.called
    return d.result  # type: ignore[no-any-return]


def test_source_static_header() -> None:
    source = credential_source(Credentials(auth_header=f"Bearer {SECRET}"))
    assert isinstance(source, StaticHeader)
    assert _header(source) == f"Bearer {SECRET}".encode()
    assert source.description == "static Authorization header"


def test_source_basic() -> None:
    source = credential_source(Credentials(username="robot", password=SECRET))
    assert isinstance(source, BasicCredentials)
    assert _header(source) == BASIC == basic_header("robot", SECRET)
    assert source.description == "basic credentials of robot"


def test_source_basic_with_empty_password() -> None:
    source = credential_source(Credentials(username="robot", password=""))
    assert isinstance(source, BasicCredentials)
    assert _header(source) == b"Basic " + base64.b64encode(b"robot:")


def test_source_google_json_key(key_file: str) -> None:
    source = credential_source(Credentials(google_key_file=key_file, google_json_key=True))
    assert isinstance(source, BasicCredentials)
    contents = Path(key_file).read_text()
    assert _header(source) == b"Basic " + base64.b64encode(f"_json_key:{contents}".encode())
    assert source.description == f"_json_key from {key_file}"


def test_source_google_key_file(key_file: str) -> None:
    source = credential_source(Credentials(google_key_file=key_file))
    assert isinstance(source, GoogleAccessTokens)
    assert source.description == f"Google key file {key_file}"
    assert source.refreshes == 0  # nothing is read or fetched until a request needs it


def test_source_google_adc() -> None:
    source = credential_source(Credentials(google_adc=True))
    assert isinstance(source, GoogleAccessTokens)
    assert source.description == "Google application default credentials"


def test_source_none() -> None:
    assert credential_source(Credentials()) is None
    assert credential_source(Credentials(username="robot")) is None


def test_sources_never_show_the_secret(key_file: str) -> None:
    for credentials in (
        Credentials(auth_header=f"Bearer {SECRET}"),
        Credentials(username="robot", password=SECRET),
        Credentials(google_key_file=key_file, google_json_key=True),
        Credentials(google_key_file=key_file),
        Credentials(google_adc=True),
    ):
        source = credential_source(credentials)
        assert source is not None
        for text in (repr(source), str(source), source.description, repr(credentials)):
            assert SECRET not in text, text
            assert "PRIVATE KEY" not in text, text


NOW = datetime.datetime(2030, 1, 2, 12, 0, 0)


class FakeGoogleCredentials:
    """google.auth credentials: ``refresh`` blocks (here: sleeps not) and sets a token."""

    def __init__(self, now: Any, lifetime: datetime.timedelta) -> None:
        self.now = now
        self.lifetime = lifetime
        self.token: str | None = None
        self.expiry: datetime.datetime | None = None
        self.refreshes = 0
        self.threads: list[int] = []
        self.requests: list[Any] = []
        self.fail_next = False

    def refresh(self, request: Any) -> None:
        self.threads.append(threading.get_ident())
        self.requests.append(request)
        if self.fail_next:
            self.fail_next = False
            raise google.auth.exceptions.RefreshError("metadata server unreachable")
        self.refreshes += 1
        self.token = f"ya29.token-{self.refreshes}"
        self.expiry = self.now() + self.lifetime


class ManualThreads:
    """Stands in for the thread pool: blocking work runs only when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, Deferred[None]]] = []
        self.ran = 0

    def __call__(self, work: Any) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self.pending.append((work, done))
        return done

    def run(self) -> None:
        pending, self.pending = self.pending, []
        for work, done in pending:
            self.ran += 1
            try:
                done.callback(work())
            except Exception:
                done.errback()


class GoogleAccessTokenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.now = NOW
        self.made = 0
        self.credentials = FakeGoogleCredentials(lambda: self.now, datetime.timedelta(hours=1))
        self.threads = ManualThreads()

        def make() -> FakeGoogleCredentials:
            self.made += 1
            return self.credentials

        self.source = GoogleAccessTokens(
            make, "Google key file /k.json", now=lambda: self.now, run_in_thread=self.threads
        )

    @staticmethod
    def header(token: str) -> bytes:
        return b"Basic " + base64.b64encode(f"oauth2accesstoken:{token}".encode())

    def authorization(self) -> Deferred[bytes]:
        d = ensureDeferred(self.source.authorization())
        self.threads.run()
        return d

    def test_refresh_runs_off_the_reactor_then_is_cached(self) -> None:
        d = ensureDeferred(self.source.authorization())
        # Nothing blocking ran on the caller's stack: it waits for the thread pool.
        self.assertNoResult(d)
        self.assertEqual(self.credentials.refreshes, 0)
        self.threads.run()
        self.assertEqual(self.successResultOf(d), self.header("ya29.token-1"))
        self.assertEqual((self.made, self.credentials.refreshes), (1, 1))
        [request] = self.credentials.requests
        self.assertIsInstance(request, google.auth.transport.requests.Request)
        # Just before expiry - margin: the token is still used as it is, with no thread.
        self.now = NOW + datetime.timedelta(hours=1) - GOOGLE_REFRESH_MARGIN
        self.now -= datetime.timedelta(seconds=1)
        self.assertEqual(
            self.successResultOf(ensureDeferred(self.source.authorization())),
            self.header("ya29.token-1"),
        )
        self.assertEqual(self.threads.ran, 1)
        # From expiry - margin on, it is refreshed first.
        self.now += datetime.timedelta(seconds=1)
        self.assertEqual(self.successResultOf(self.authorization()), self.header("ya29.token-2"))
        self.assertEqual((self.made, self.credentials.refreshes, self.source.refreshes), (1, 2, 2))

    def test_concurrent_calls_share_one_refresh(self) -> None:
        calls = [ensureDeferred(self.source.authorization()) for _ in range(5)]
        for _ in range(5):
            self.threads.run()
        headers = [self.successResultOf(d) for d in calls]
        self.assertEqual(headers, [self.header("ya29.token-1")] * 5)
        self.assertEqual((self.made, self.credentials.refreshes, self.threads.ran), (1, 1, 1))

    def test_failed_refresh_is_retried_by_the_next_call(self) -> None:
        self.credentials.fail_next = True
        self.failureResultOf(self.authorization(), google.auth.exceptions.RefreshError)
        self.assertEqual(self.source.refreshes, 0)
        self.assertEqual(self.successResultOf(self.authorization()), self.header("ya29.token-1"))
        self.assertEqual((self.made, len(self.credentials.requests)), (1, 2))

    def test_token_without_expiry_is_kept(self) -> None:
        self.credentials.lifetime = None  # type: ignore[assignment]
        self.credentials.now = lambda: None  # type: ignore[assignment]

        def refresh(request: Any) -> None:
            self.credentials.refreshes += 1
            self.credentials.token = "ya29.forever"
            self.credentials.expiry = None

        self.credentials.refresh = refresh  # type: ignore[method-assign]
        self.assertEqual(self.successResultOf(self.authorization()), self.header("ya29.forever"))
        self.now = NOW + datetime.timedelta(days=365)
        self.assertEqual(self.successResultOf(self.authorization()), self.header("ya29.forever"))
        self.assertEqual(self.credentials.refreshes, 1)

    def test_google_tokens_answer_a_bearer_challenge(self) -> None:
        """Through UpstreamAuth: the realm gets the access token as basic credentials."""
        realm = Realm()
        realm.on("/v2/token", token_answer(token="registry-tok", expires_in=300))
        agent = RequestTraversalAgent(realm)
        route = Route(Upstream("https", "gcr.io"), credentials=Credentials(google_adc=True))
        clock = Clock()
        auth = UpstreamAuth(
            upstream=UpstreamClient(HTTPClient(agent), clock=clock, timeout=5, idle_timeout=5),
            sources={"default": self.source},
        )
        item = auth.plan(route, [b'Bearer realm="https://gcr.io/v2/token",service="gcr.io"'])
        assert item is not None
        # A Google credential never goes to a realm that is not a Google registry's.
        self.assertIsNone(auth.plan(route, [BEARER]))

        d = ensureDeferred(auth.answer(route, SCOPE, item))
        for _ in range(5):
            self.threads.run()
            realm.release()
            agent.flush()
        self.assertEqual(self.successResultOf(d), b"Bearer registry-tok")
        [seen] = realm.seen
        self.assertEqual(
            seen.headers.getRawHeaders(b"authorization"), [self.header("ya29.token-1")]
        )
