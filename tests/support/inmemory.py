"""The in-memory test bench: the whole resource tree with a fake registry behind it.

The proxy is wired as ``regproxy.service.build_service`` wires it, except that its upstream
client talks to :class:`FakeRegistry` through ``treq.testing.RequestTraversalAgent`` and the
client side is ``treq.testing.StubTreq``. Nothing touches the network or the global reactor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import attrs
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from regproxy.config import Config, Route, Upstream
from regproxy.service import build_root
from regproxy.upstream.treq_client import IdentityEncodingAgent, NoCookies
from regproxy.web.health import Readiness
from regproxy.web.observe import Metrics
from regproxy.web.root import Root

PROXY = "http://proxy.example"
UPSTREAM = "https://upstream.example"
AUTH_REALM = "https://auth.upstream.example/token"
DIGEST = "sha256:" + "0123456789abcdef" * 4
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
JSON_HEADERS = {b"content-type": [b"application/json"]}


@attrs.frozen
class Seen:
    """One request as the fake upstream registry received it."""

    method: bytes
    host: bytes
    path: str
    query: list[tuple[str, str]]
    headers: Headers
    body: bytes


@attrs.frozen
class Answer:
    status: int = 200
    headers: dict[bytes, list[bytes]] = attrs.field(factory=dict)
    body: bytes = b""


class FakeRegistry(Resource):
    """Plays the upstream registry and its token service; records what it was asked."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.answers: dict[str, Answer | Callable[[Request], Answer]] = {}

    def on(self, path: str, answer: Answer | Callable[[Request], Answer]) -> None:
        self.answers[path] = answer

    def render(self, request: Request) -> bytes:
        uri = request.uri.decode("ascii")
        path, _, query = uri.partition("?")
        assert request.content is not None
        self.seen.append(
            Seen(
                method=request.method,
                host=request.getHeader(b"host") or b"",
                path=path,
                query=parse_qsl(query, keep_blank_values=True),
                headers=request.requestHeaders.copy(),
                body=request.content.read(),
            )
        )
        answer = self.answers.get(uri) or self.answers.get(path)
        if callable(answer):
            answer = answer(request)
        if answer is None:
            answer = Answer(
                404,
                {b"content-type": [b"application/json"]},
                b'{"errors":[{"code":"NOT_FOUND","message":"no answer recorded"}]}',
            )
        request.setResponseCode(answer.status)
        for name, values in answer.headers.items():
            request.responseHeaders.setRawHeaders(name, values)
        return answer.body


@implementer(IBodyProducer)
class SyncProducer:
    """Produces a request body at once (the default one needs the global reactor)."""

    def __init__(self, body: bytes | str) -> None:
        self.body = body.encode("utf-8") if isinstance(body, str) else body
        self.length = len(self.body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


@implementer(IAgent)
class FailingAgent:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.requests = 0

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None):  # type: ignore[no-untyped-def]
        self.requests += 1
        return fail(self.error)


def in_memory_client(agent: IAgent) -> HTTPClient:
    """The treq client the service makes, over an in-memory agent."""
    return HTTPClient(
        IdentityEncodingAgent(agent), cookiejar=NoCookies(), data_to_body_producer=SyncProducer
    )


def build_tree(config: Config, agent: IAgent, clock: Clock, **parts: Any) -> Root:
    """What ``regproxy.service.build_service`` serves, with an in-memory upstream agent
    (``parts``: more of ``build_root``'s arguments, such as a cache or a follow client)."""
    return build_root(
        config,
        client=in_memory_client(agent),
        clock=clock,
        metrics=Metrics(),
        readiness=Readiness(),
        **parts,
    )


@attrs.frozen
class Reply:
    status: int
    headers: Headers
    body: bytes
    # twisted's client moves Content-Length out of the headers into IResponse.length.
    length: int | None

    def header(self, name: bytes) -> list[bytes]:
        return self.headers.getRawHeaders(name, [])

    def json(self) -> Any:
        return json.loads(self.body)


class ProxyCase(SynchronousTestCase):
    route = Route(Upstream("https", "upstream.example"), prefix="proj")

    def setUp(self) -> None:
        self.registry = FakeRegistry()
        self.upstream_agent = RequestTraversalAgent(self.registry)
        self.clock = Clock()
        self.make_proxy(self.upstream_agent)
        self.delayed_before = len(global_reactor.getDelayedCalls())

    def make_proxy(self, agent: IAgent, **config: Any) -> None:
        self.config = Config(routes=(self.route,), **config)
        self.proxy = StubTreq(build_tree(self.config, agent, self.clock))

    def tearDown(self) -> None:
        # Everything ran on in-memory reactors: nothing may be left on the real one.
        self.assertEqual(len(global_reactor.getDelayedCalls()), self.delayed_before)

    def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        kwargs.setdefault("allow_redirects", False)
        d = self.proxy.request(method, PROXY + path, **kwargs)
        for _ in range(10):
            if d.called:
                break
            self.upstream_agent.flush()
            self.proxy.flush()
        response = self.successResultOf(d)
        body = self.proxy.content(response)
        for _ in range(10):
            if body.called:
                break
            self.upstream_agent.flush()
            self.proxy.flush()
        length = response.length if isinstance(response.length, int) else None
        return Reply(response.code, response.headers, self.successResultOf(body), length)

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def only_seen(self) -> Seen:
        self.assertEqual(len(self.registry.seen), 1, self.registry.seen)
        return self.registry.seen[0]

    def assert_oci_error(self, reply: Reply, status: int, code: str) -> dict[str, Any]:
        self.assertEqual(reply.status, status)
        self.assertEqual(reply.header(b"docker-distribution-api-version"), [b"registry/2.0"])
        self.assertEqual(reply.header(b"content-type"), [b"application/json; charset=utf-8"])
        self.assertEqual(reply.length, len(reply.body))
        [error] = reply.json()["errors"]
        self.assertEqual(error["code"], code)
        return error
