"""``/_token`` and the token realm it forwards to: learnt from the upstream, once, kept
through clients that leave, learnt again when it stops working."""

from __future__ import annotations

import json
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from regproxy.config import Route, Upstream
from regproxy.upstream.client import UpstreamClient
from regproxy.upstream.realm import Realm, RealmCache
from tests.support.inmemory import AUTH_REALM, Answer, ProxyCase

BEARER = {
    b"www-authenticate": [f'Bearer realm="{AUTH_REALM}",service="upstream.example"'.encode()]
}
TOKEN = Answer(200, {b"content-type": [b"application/json"]}, b'{"token":"t"}')
ROUTE = Route(Upstream("https", "upstream.example"))


class RealmRelearntTests(ProxyCase):
    def test_a_v2_answer_without_challenge_is_not_remembered(self) -> None:
        answers = iter([Answer(503), Answer(401, BEARER)])
        self.registry.on("/v2/", lambda request: next(answers))
        self.registry.on("/token", TOKEN)
        first = self.get("/_token?scope=repository:app:pull")
        self.assertEqual((first.status, first.json()["errors"][0]["code"]), (404, "NOT_FOUND"))
        second = self.get("/_token?scope=repository:app:pull")
        self.assertEqual(second.status, 200)
        self.assertEqual(json.loads(second.body), {"token": "t"})

    def test_an_http_realm_of_an_https_upstream_is_refused(self) -> None:
        challenge = b'Bearer realm="http://auth.upstream.example/token",service="s"'
        self.registry.on("/v2/", Answer(401, {b"www-authenticate": [challenge]}))
        reply = self.get("/_token?scope=repository:app:pull")
        self.assertEqual((reply.status, reply.json()["errors"][0]["code"]), (404, "NOT_FOUND"))
        self.assertEqual([seen.path for seen in self.registry.seen], ["/v2/"])

    def test_a_realm_on_a_foreign_host_is_never_sent_credentials(self) -> None:
        challenge = b'Bearer realm="https://collector.evil.example/token",service="s"'
        self.registry.on("/v2/", Answer(401, {b"www-authenticate": [challenge]}))
        reply = self.get(
            "/_token?scope=repository:app:pull",
            headers={b"authorization": [b"Basic dXNlcjpwdw=="]},
        )
        self.assertEqual(reply.status, 404)
        self.assertEqual([seen.host for seen in self.registry.seen], [b"upstream.example"])

    def test_token_answers_keep_their_content_length(self) -> None:
        self.registry.on("/v2/", Answer(401, BEARER))
        self.registry.on("/token", TOKEN)
        reply = self.get("/_token?scope=repository:app:pull")
        self.assertEqual(reply.length, len(b'{"token":"t"}'))


@implementer(IAgent)
class HeldAgent:
    """Each request waits until the test answers it, as a slow upstream would."""

    def __init__(self) -> None:
        self.pending: list[Deferred[Any]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None):  # type: ignore[no-untyped-def]
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d


class FakeResponse:
    """Just enough of IResponse for a bodiless 401 challenge."""

    code = 401
    phrase = b"Unauthorized"
    length = 0
    version = (b"HTTP", 1, 1)

    def __init__(self) -> None:
        self.headers = Headers(BEARER)
        self.request = None
        self.previousResponse = None

    def deliverBody(self, protocol: Any) -> None:
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseDone

        protocol.makeConnection(None)
        protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response: Any) -> None:
        pass


class RealmCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.agent = HeldAgent()
        self.clock = Clock()
        upstream = UpstreamClient(
            HTTPClient(self.agent), clock=self.clock, timeout=30, idle_timeout=30
        )
        self.realms = RealmCache(upstream)

    def answer_all(self) -> None:
        pending, self.agent.pending = self.agent.pending, []
        for d in pending:
            d.callback(FakeResponse())

    def test_concurrent_requests_learn_the_realm_once(self) -> None:
        waiters = [ensureDeferred(self.realms.realm(ROUTE)) for _ in range(5)]
        self.assertEqual(len(self.agent.pending), 1)
        self.answer_all()
        expected = Realm(AUTH_REALM, "upstream.example")
        for waiter in waiters:
            self.assertEqual(self.successResultOf(waiter), expected)

    def test_a_client_that_leaves_neither_cancels_nor_forgets_the_lookup(self) -> None:
        leaving = ensureDeferred(self.realms.realm(ROUTE))
        staying = ensureDeferred(self.realms.realm(ROUTE))
        leaving.cancel()
        self.failureResultOf(leaving, CancelledError)
        self.answer_all()
        self.assertEqual(self.successResultOf(staying).url, AUTH_REALM)
        # Learnt for good: the next request asks nothing upstream.
        again = ensureDeferred(self.realms.realm(ROUTE))
        self.assertEqual(self.successResultOf(again).url, AUTH_REALM)
        self.assertEqual(self.agent.pending, [])

    def test_a_timeout_is_an_error_for_every_waiter_and_nothing_is_kept(self) -> None:
        waiters = [ensureDeferred(self.realms.realm(ROUTE)) for _ in range(2)]
        self.clock.advance(31)
        for waiter in waiters:
            self.assertEqual(self.failureResultOf(waiter).value.status, 504)
        ensureDeferred(self.realms.realm(ROUTE))
        self.assertEqual(len(self.agent.pending), 2)  # the cancelled one and a new lookup


class NoRealmTests(SynchronousTestCase):
    def test_an_upstream_without_a_realm_is_asked_once_a_minute_and_logged_once(self) -> None:
        agent = HeldAgent()
        clock = Clock()
        realms = RealmCache(
            UpstreamClient(HTTPClient(agent), clock=clock, timeout=30, idle_timeout=30)
        )

        class NoChallenge(FakeResponse):
            code = 200

            def __init__(self) -> None:
                super().__init__()
                self.headers = Headers()

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        first = ensureDeferred(realms.realm(ROUTE))
        agent.pending.pop().callback(NoChallenge())
        self.assertIsNone(self.successResultOf(first))
        for _ in range(5):
            self.assertIsNone(self.successResultOf(ensureDeferred(realms.realm(ROUTE))))
        self.assertEqual(agent.pending, [])  # not asked again within the minute
        clock.advance(61)
        again = ensureDeferred(realms.realm(ROUTE))
        agent.pending.pop().callback(NoChallenge())
        self.assertIsNone(self.successResultOf(again))
        warnings = [
            e for e in events if "without a usable Bearer realm" in e.get("log_format", "")
        ]
        self.assertEqual(len(warnings), 1)
