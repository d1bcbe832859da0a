"""The treq client the proxy forwards with: pooled, verifying, unbuffered, cookie-free."""

from __future__ import annotations

from http.cookiejar import Cookie, CookieJar
from typing import Any

from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IPolicyForHTTPS,
    IResponse,
)
from zope.interface import implementer


class NoCookies(CookieJar):
    """A jar that keeps nothing: a shared one would hand one client's cookies to another."""

    def set_cookie(self, cookie: Cookie) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


@implementer(IAgent)
class IdentityEncodingAgent:
    """Undo treq's ``Accept-Encoding: gzip`` and its decoding.

    treq always asks for gzip and then decodes it, which would hand clients bytes that no
    longer match the upstream's Content-Length and digests. Without the header the upstream
    sends the bytes as stored; should it encode them anyway, the Content-Encoding header is
    hidden from treq's decoder (under HIDDEN_CONTENT_ENCODING) and the bytes pass as sent.
    """

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        if headers is not None:
            headers.removeHeader(b"accept-encoding")
        return self._agent.request(method, uri, headers, bodyProducer).addCallback(
            _hide_content_encoding
        )


HIDDEN_CONTENT_ENCODING = b"x-regproxy-upstream-content-encoding"


def _hide_content_encoding(response: IResponse) -> IResponse:
    values = response.headers.getRawHeaders(b"content-encoding")
    if values:
        response.headers.removeHeader(b"content-encoding")
        response.headers.setRawHeaders(HIDDEN_CONTENT_ENCODING, values)
    return response


@implementer(IOpenSSLTrustRoot)
class SystemPlusCA:
    """Trust the system store and, in addition, an operator-given PEM bundle."""

    def __init__(self, ca_file: str | None) -> None:
        self._ca_file = ca_file

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        if self._ca_file:
            context.load_verify_locations(self._ca_file)


def tls_policy(ca_file: str | None) -> IPolicyForHTTPS:
    if ca_file:
        # Load once now, so a bad file fails at start-up rather than on the first request.
        SSL.Context(SSL.TLS_METHOD).load_verify_locations(ca_file)
    return BrowserLikePolicyForHTTPS(trustRoot=SystemPlusCA(ca_file))


class _QuietConnectionFactory(_HTTP11ClientFactory):
    # Not one "Starting factory"/"Stopping factory" log pair per upstream connection.
    noisy = False


def make_pool(reactor: IReactorTime, max_per_host: int = 64) -> HTTPConnectionPool:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietConnectionFactory
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = 120
    pool.retryAutomatically = True
    return pool


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """One endpoint per upstream origin, made once.

    Twisted's Agent builds a new HostnameEndpoint (IDNA-encoding the host) and, for https,
    a new TLS connection creator for every request, even when a pooled connection then
    serves it: measurable per-request CPU for a proxy that talks to one or two hosts.
    """

    MAX_ENTRIES = 256  # upstreams plus blob storage hosts seen in follow mode

    def __init__(self, reactor: Any, policy: IPolicyForHTTPS, connect_timeout: float) -> None:
        self._reactor = reactor
        self._policy = policy
        self._connect_timeout = connect_timeout
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
            endpoint = HostnameEndpoint(
                self._reactor, uri.host.decode("ascii"), uri.port, timeout=self._connect_timeout
            )
            if uri.scheme == b"https":
                creator = self._policy.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(creator, endpoint)
            if len(self._endpoints) >= self.MAX_ENTRIES:
                self._endpoints.clear()
            self._endpoints[key] = endpoint
        return endpoint


def make_client(
    reactor: Any,
    *,
    pool: HTTPConnectionPool,
    ca_file: str | None = None,
    connect_timeout: float = 10.0,
) -> HTTPClient:
    endpoints = CachedEndpoints(reactor, tls_policy(ca_file), connect_timeout)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    return HTTPClient(IdentityEncodingAgent(agent), cookiejar=NoCookies())  # type: ignore[arg-type]
