"""The treq client the proxy forwards with: pooled, verifying, unbuffered, cookie-free."""

from __future__ import annotations

from http.cookiejar import Cookie, CookieJar
from typing import Any

from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IPolicyForHTTPS, IResponse
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


def make_pool(reactor: IReactorTime, max_per_host: int = 64) -> HTTPConnectionPool:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = 120
    pool.retryAutomatically = True
    return pool


def make_client(
    reactor: Any,
    *,
    pool: HTTPConnectionPool,
    ca_file: str | None = None,
    connect_timeout: float = 10.0,
) -> HTTPClient:
    agent = Agent(
        reactor,
        contextFactory=tls_policy(ca_file),
        connectTimeout=connect_timeout,
        pool=pool,
    )
    return HTTPClient(IdentityEncodingAgent(agent), cookiejar=NoCookies())  # type: ignore[arg-type]
