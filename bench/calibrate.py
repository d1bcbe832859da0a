"""The floor under regproxy's CPU per request: three bare servers measured beside it.

``python -m bench.calibrate KIND --listen ENDPOINT --upstream URL --prefix P [--upstream-ca CA]
[--body FILE --content-type TYPE]``

- ``site``: a bare twisted.web ``Site`` answering every GET with the manifest bytes itself
  (what serving costs with no client at all);
- ``agent``: a bare relay through Twisted's ``Agent`` with a persistent pool: the path gets
  the prefix, ``Accept`` goes upstream, status, content headers and body come back;
- ``treq``: the same relay through ``treq.HTTPClient`` over that Agent (unbuffered);
- ``wire``: the relay through regproxy's own agent and connection protocol
  (``regproxy.upstream._pool`` over ``regproxy.upstream._connection``);
- ``treq-wire``: the relay through regproxy's treq client over that agent, exactly as
  regproxy builds it (``regproxy.upstream.treq_client.make_client``): the floor under regproxy
  while treq stays its forwarding API and twisted.web its server.

None logs, validates, rewrites or counts anything: regproxy's figure minus these is what
regproxy's own code costs. Each listens on a Twisted endpoint (``ssl:`` for TLS listeners).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.endpoints import serverFromString
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, Response
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

# Response headers a registry client needs; the rest stays behind, as a bare relay would.
RELAYED = (b"content-type", b"content-length", b"docker-content-digest", b"etag")


class QuietSite(Site):
    def log(self, request: Request) -> None:  # type: ignore[override]
        """No access log: the floor, not a deployable server."""


class Fixed(Resource):
    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes) -> None:
        super().__init__()
        self.body = body
        self.content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        return self.body


class _Copy(protocol.Protocol):
    def __init__(self, request: Request) -> None:
        self.request = request

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.request.finish()


class Relay(Resource):
    """GET ``/v2/<rest>`` from ``<upstream>/v2/<prefix>/<rest>`` with an Agent or treq."""

    isLeaf = True

    def __init__(self, agent: Any, upstream: str, prefix: str, use_treq: bool) -> None:
        super().__init__()
        self.agent = agent
        self.client = HTTPClient(agent)
        self.upstream = upstream.encode()
        self.prefix = prefix.encode()
        self.use_treq = use_treq

    def render_GET(self, request: Request) -> Any:
        rest = request.uri.partition(b"/v2/")[2]
        url = self.upstream + b"/v2/" + self.prefix + b"/" + rest
        headers = Headers({b"accept": request.requestHeaders.getRawHeaders(b"accept") or []})
        if self.use_treq:
            d = self.client.request(
                "GET", url, headers=headers, unbuffered=True, allow_redirects=False
            )
        else:
            d = self.agent.request(b"GET", url, headers)
        d.addCallback(self._answer, request)
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _answer(self, response: Response, request: Request) -> defer.Deferred[None] | None:
        request.setResponseCode(response.code)
        for name in RELAYED:
            values = response.headers.getRawHeaders(name)
            if values:
                request.responseHeaders.setRawHeaders(name, values)
        if self.use_treq:
            done = treq.collect(response, request.write)
            done.addCallback(lambda _: request.finish())
            return done
        response.deliverBody(_Copy(request))
        return None

    def _failed(self, failure: Failure, request: Request) -> None:
        print(failure.getTraceback(), file=sys.stderr, flush=True)
        if not request.finished:
            request.setResponseCode(502)
            request.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.calibrate")
    parser.add_argument("kind", choices=("site", "agent", "treq", "wire", "treq-wire"))
    parser.add_argument("--listen", required=True, help="a Twisted endpoint, e.g. tcp:8080")
    parser.add_argument("--upstream", help="registry URL (agent, treq)")
    parser.add_argument("--prefix", default="", help="repository prefix added upstream")
    parser.add_argument("--upstream-ca", type=Path, help="PEM CA the upstream's TLS needs")
    parser.add_argument("--body", type=Path, help="the bytes site answers with")
    parser.add_argument("--content-type", default="application/vnd.oci.image.manifest.v1+json")
    args = parser.parse_args(argv)

    resource: Resource
    if args.kind == "site":
        resource = Fixed(args.body.read_bytes(), args.content_type.encode())
    elif args.kind in ("wire", "treq-wire"):
        from regproxy.upstream._tls import tls_context
        from regproxy.upstream.treq_client import CachedEndpoints, make_client, make_pool

        ca = str(args.upstream_ca) if args.upstream_ca else None
        pool = make_pool(reactor)
        client = make_client(reactor, pool=pool, ca_file=ca)
        agent = pool.agent(CachedEndpoints(reactor, tls_context(ca), 10.0))
        resource = Relay(agent, args.upstream, args.prefix, use_treq=args.kind == "treq-wire")
        resource.client = client
    else:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 64
        policy = BrowserLikePolicyForHTTPS()
        if args.upstream_ca:
            trust = ssl.Certificate.loadPEM(args.upstream_ca.read_bytes())
            policy = BrowserLikePolicyForHTTPS(trustRoot=trust)
        agent = Agent(reactor, contextFactory=policy, pool=pool)
        resource = Relay(agent, args.upstream, args.prefix, use_treq=args.kind == "treq")
    site = QuietSite(resource)
    serverFromString(reactor, args.listen).listen(site)
    reactor.run()


if __name__ == "__main__":
    main()
