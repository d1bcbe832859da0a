"""The treq client the proxy forwards with: pooled, verifying, unbuffered, cookie-free."""

from __future__ import annotations

import functools
import re
import ssl
from http.cookiejar import Cookie, CookieJar
from typing import Any, cast

from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.web.client import (
    URI,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IResponse,
)
from zope.interface import implementer

from ..config import Upstream
from ..protocol.headers import HIDDEN_CONTENT_ENCODING

# The connection pool lives in a private module: the wiring takes it from here.
from ._pool import UpstreamPool as UpstreamPool
from ._tls import TLSEndpoint, tls_context
from .redirects import GuardedEndpoints


class NoCookies(CookieJar):
    """A jar that keeps nothing: a shared one would hand one client's cookies to another."""

    def set_cookie(self, cookie: Cookie) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def add_cookie_header(self, request: Any) -> None:
        """Nothing to add: skips the jar's lock and its walk over no cookies, per request."""


class SentAsIs(EncodedURL):
    """A URL that is already what goes on the wire (ASCII, percent-encoded, no IDN).

    treq turns every URL it is given into its URI form (``to_uri``), which re-encodes each
    part and runs the host through IDNA: about 50 us per request here, for URLs that
    regproxy built from ASCII parts in the first place. treq accepts an ``EncodedURL``;
    this one is its own URI form, and renders its text once (it is immutable, and has no
    user info for ``with_password`` to hide). ``tests/unit/upstream/test_agent_treq.py``
    checks that treq still sends such a URL byte for byte, so a treq change cannot go
    unnoticed.
    """

    _text: str | None = None

    def to_uri(self) -> SentAsIs:
        return self

    def to_text(self, with_password: bool = False) -> str:
        if self._text is None:
            self._text = str(super().to_text(with_password))
        return self._text


# URLs whose URI form is themselves: lower-case host names or IP literals, and a path and
# query of characters that ``to_uri`` leaves alone (not ``[ ] | { } ^ ` " < > \`` or
# space, which it percent-encodes). Anything else takes treq's full encoding.
_WIRE_READY = re.compile(
    r"https?://(?:[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?"
    r"(?:/[A-Za-z0-9\-._~:/?@!$&'()*+,;=%]*)?"
)


def wire_url(url: str | bytes) -> EncodedURL | str | bytes:
    """``url`` as treq needs it: parsed once, and not re-encoded when it needs none."""
    text = url.decode("ascii", "replace") if isinstance(url, bytes) else url
    return _parsed(text) or url


@functools.lru_cache(maxsize=1024)
def _parsed(text: str) -> SentAsIs | None:
    """Parsed URLs are immutable, so the ones asked for again (a manifest by tag, the
    token realm, ``/v2/``) are parsed once: hyperlink's parser costs about 20 us."""
    if _WIRE_READY.fullmatch(text) is None:
        return None
    return cast(SentAsIs, SentAsIs.from_text(text))  # from_text is a classmethod: cls(...)


class ProxyHTTPClient(HTTPClient):
    """treq's client with its per-request work cut to what a proxy needs.

    Two things treq does on every request that its own public arguments let us skip: the
    URL's re-encoding (see :class:`SentAsIs`) and a fresh cookie jar for the (absent)
    ``cookies=`` argument; an empty jar made once is handed in instead. The forwarding
    arguments themselves (``unbuffered``, ``allow_redirects``) stay with the caller.
    """

    _NO_COOKIES = CookieJar()

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        if isinstance(url, (str, bytes)):
            url = wire_url(url)
        kwargs.setdefault("cookies", self._NO_COOKIES)
        return super().request(method, url, **kwargs)


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


def _hide_content_encoding(response: IResponse) -> IResponse:
    values = response.headers.getRawHeaders(b"content-encoding")
    if values:
        response.headers.removeHeader(b"content-encoding")
        response.headers.setRawHeaders(HIDDEN_CONTENT_ENCODING, values)
    return response


def make_pool(reactor: IReactorTime, max_per_host: int = 64) -> UpstreamPool:
    """Idle upstream connections: up to ``max_per_host`` per origin, closed after 120 s."""
    return UpstreamPool(reactor, max_idle_per_origin=max_per_host, idle_timeout=120.0)


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """One endpoint per upstream origin, made once.

    Twisted's Agent builds a new HostnameEndpoint (IDNA-encoding the host) and, for https,
    a new TLS connection creator for every request, even when a pooled connection then
    serves it: measurable per-request CPU for a proxy that talks to one or two hosts.
    """

    MAX_ENTRIES = 256  # upstreams plus blob storage hosts seen in follow mode

    def __init__(self, reactor: Any, tls: ssl.SSLContext, connect_timeout: float) -> None:
        self._reactor = reactor
        self._tls = tls
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
                endpoint = TLSEndpoint(self._tls, uri.host.decode("ascii"), endpoint)
            if len(self._endpoints) >= self.MAX_ENTRIES:
                self._endpoints.clear()
            self._endpoints[key] = endpoint
        return endpoint


def make_client(
    reactor: Any,
    *,
    pool: UpstreamPool,
    ca_file: str | None = None,
    connect_timeout: float = 10.0,
    guard_redirects_from: Upstream | None = None,
) -> HTTPClient:
    """The treq client; with ``guard_redirects_from``, one for blob redirect targets of that
    upstream, whose endpoints refuse non-public addresses before connecting."""
    tls = tls_context(ca_file)
    endpoints: IAgentEndpointFactory
    if guard_redirects_from is not None:
        endpoints = GuardedEndpoints(
            reactor, upstream=guard_redirects_from, tls=tls, connect_timeout=connect_timeout
        )
    else:
        endpoints = CachedEndpoints(reactor, tls, connect_timeout)
    agent = pool.agent(endpoints)
    return ProxyHTTPClient(IdentityEncodingAgent(agent), cookiejar=NoCookies())  # type: ignore[arg-type]
