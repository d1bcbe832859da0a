"""One validated registry request: mapped, sent upstream, rewritten, relayed.

The steps are stages of their own (:mod:`regproxy.protocol.mapping`, :class:`UpstreamClient`,
:mod:`regproxy.protocol.rewrite`, :mod:`regproxy.relay`); this module is the glue between them, with
the decisions that need the upstream's answer: answering its challenge with the proxy's own
credentials, following a blob redirect, and what the access event records.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from urllib.parse import quote, urljoin

import attrs
from treq.client import HTTPClient
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from .cache.fetcher import (
    HANDLED,
    CacheRequest,
    CachingFetcher,
    Relay,
    accept_key,
    credential_key,
)
from .config import BlobRedirects, Route
from .protocol import bodies
from .protocol.errors import OCIError
from .protocol.mapping import UpstreamRequest, map_request
from .protocol.reference import Kind, RegistryPath
from .protocol.rewrite import ResponseRewriter
from .relay import relay_response
from .routing.matching import RouteMatch
from .upstream.auth import UpstreamAuth
from .upstream.client import FailureKind, RedirectRefused, UpstreamClient, UpstreamFailure
from .upstream.redirects import check_scheme
from .web.observe import Exchange
from .web.respond import write_body

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CACHED_KINDS = frozenset({Kind.BLOB, Kind.MANIFEST})
# Range is the client's business with the cache: the cache fetches whole objects.
WHOLE_OBJECT_DROPS = (b"range", b"if-range")
MAX_REDIRECTS = 5
_SIZE = re.compile(rb"bytes \*/(\d{1,19})")
_LAST = re.compile(rb"([?&]last=)[^&>]*")


def set_last(link: bytes, last: str) -> bytes:
    """A _catalog Link whose cursor is ``last`` (the last name this client was shown)."""
    return _LAST.sub(lambda m: m.group(1) + quote(last, safe="").encode(), link)


async def send(
    upstream: UpstreamClient,
    exchange: Exchange,
    method: str,
    url: str,
    *,
    headers: Headers,
    route: str,
    body: bytes | None = None,
    http: HTTPClient | None = None,
) -> IResponse:
    """Send through the upstream client, recording on the access event what happened."""
    started = upstream.clock.seconds()
    try:
        response = await upstream.send(
            method, url, headers=headers, route=route, body=body, http=http
        )
    except UpstreamFailure as failure:
        exchange.error_kind = str(failure.kind)
        raise failure.oci() from None
    exchange.upstream_seconds = upstream.clock.seconds() - started
    exchange.upstream_status = response.code
    return response


async def relay(
    request: Request,
    response: IResponse,
    rewriter: ResponseRewriter,
    upstream: UpstreamClient,
    exchange: Exchange,
    *,
    has_body: bool,
) -> None:
    """Copy the (rewritten) status and headers, then stream or rewrite the body.

    ``has_body``: whether the upstream answer carries one (not for a HEAD sent as HEAD,
    nor for statuses that never have one).
    """
    status = response.code
    request.setResponseCode(status, response.phrase)
    for name, values in rewriter.headers(response.headers):
        request.responseHeaders.setRawHeaders(name, values)
    content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
    rewrite = rewriter.body(status, content_type)
    if not has_body:
        if rewrite is not None:
            # The upstream's Content-Length describes its own body, not the rewritten one
            # a GET gets: no length is better than a wrong one. (HEADs on list endpoints
            # avoid this: they go upstream as GETs.)
            request.responseHeaders.removeHeader(b"content-length")
        upstream.discard(response)
        request.finish()
        return
    if rewrite is None:
        if request.method == b"HEAD":
            length = upstream.known_length(response)
            if length is not None:
                request.setHeader(b"content-length", b"%d" % length)
            upstream.abandon(response)
            request.finish()
            return
        await relay_response(
            request,
            response,
            clock=upstream.clock,
            idle_timeout=upstream.idle_timeout,
            exchange=exchange,
        )
        return
    limit = bodies.LIST_BODY_LIMIT if status == 200 else bodies.ERROR_BODY_LIMIT
    rewritten = rewrite(await upstream.read(response, limit))
    if rewritten.drop_link:
        request.responseHeaders.removeHeader(b"link")
    elif rewritten.link_last is not None:
        links = request.responseHeaders.getRawHeaders(b"link") or []
        request.responseHeaders.setRawHeaders(
            b"link", [set_last(link, rewritten.link_last) for link in links]
        )
    request.setHeader(b"content-length", b"%d" % len(rewritten.body))
    if request.method != b"HEAD":
        request.write(rewritten.body)
    request.finish()


class Forwarder:
    """Forwards registry API requests of any route through the one upstream client."""

    def __init__(
        self,
        *,
        upstream: UpstreamClient,
        auth: UpstreamAuth,
        public_base: Callable[[Request], str],
        follow_http: Mapping[str, HTTPClient] | None = None,
        cache: CachingFetcher | None = None,
    ) -> None:
        self.upstream = upstream
        self.auth = auth
        self.public_base = public_base
        # Per route: redirect targets are fetched through endpoints that refuse non-public
        # addresses (tests of the follow logic hand in their in-memory client).
        self.follow_http = dict(follow_http or {})
        self.cache = cache

    async def forward(
        self, request: Request, match: RouteMatch, client_target: RegistryPath, exchange: Exchange
    ) -> None:
        """Forward ``client_target`` (as the client named it) to the route ``match`` found."""
        route = match.route
        target = attrs.evolve(client_target, name=match.name)
        mapped = map_request(
            method=request.method,
            target=target,
            route=route,
            raw_query=request.uri.partition(b"?")[2],
            client_headers=request.requestHeaders,
            client_host=request.getRequestHostname(),
            mount=match.mount,
            client_target=client_target,
        )
        rewriter = ResponseRewriter(
            mount=match.mount,
            target=client_target,
            upstream_name=mapped.upstream_name,
            upstream_url=mapped.url,
            public_base=self.public_base(request),
        )
        if self.cache is not None and route.cache and target.kind in CACHED_KINDS:
            outcome = await self.cache.handle(
                self._cache_request(request, route, target, mapped),
                _CacheOps(self, request, route, mapped, rewriter, exchange),
                exchange,
            )
            if outcome is HANDLED:
                return
            if isinstance(outcome, Relay):
                await self._relay(request, match, client_target, mapped, outcome, exchange)
                return
        try:
            response = await self._authorized(request, route, mapped, exchange)
        except OCIError as error:
            if target.kind is Kind.BASE and self.cache is not None and error.status in (502, 504):
                # The upstream is down, and clients ping /v2/ before every pull: with a
                # cache, what it holds can still be served, so the ping says so.
                exchange.cache = "stale"
                write_body(request, 200, b"{}", b"application/json")
                return
            raise
        url = mapped.url
        if (
            route.blob_redirects is BlobRedirects.FOLLOW
            and target.kind is Kind.BLOB
            and response.code in REDIRECT_STATUSES
        ):
            response, url = await self._follow(mapped, response, route, exchange)
        await self._relay(request, match, client_target, mapped, Relay(response, url), exchange)

    async def _relay(
        self,
        request: Request,
        match: RouteMatch,
        client_target: RegistryPath,
        mapped: UpstreamRequest,
        answer: Relay,
        exchange: Exchange,
    ) -> None:
        response = answer.response
        if response.code == 416:
            self._range_not_satisfiable(response)
        rewriter = ResponseRewriter(
            mount=match.mount,
            target=client_target,
            upstream_name=mapped.upstream_name,
            upstream_url=answer.url,
            public_base=self.public_base(request),
        )
        status = response.code
        sent_method = response.request.method if response.request is not None else b"GET"
        has_body = sent_method != b"HEAD" and status not in (204, 304) and status >= 200
        await relay(request, response, rewriter, self.upstream, exchange, has_body=has_body)

    def _cache_request(
        self, request: Request, route: Route, target: RegistryPath, mapped: UpstreamRequest
    ) -> CacheRequest:
        assert mapped.upstream_name is not None
        name = mapped.upstream_name
        client_auth = request.requestHeaders.getRawHeaders(b"authorization")
        return CacheRequest(
            request=request,
            route=route.name,
            repository=name,
            is_manifest=target.kind is Kind.MANIFEST,
            reference=target.reference,
            url=mapped.url.partition("?")[0],
            digest_url=lambda digest: (
                route.upstream.origin + attrs.evolve(target, reference=digest).path(name)
            ),
            accept_key=accept_key(request.requestHeaders.getRawHeaders(b"accept", [])),
            credential=None
            if self.auth.configured(route)
            else credential_key(client_auth[0] if client_auth else None),
        )

    async def _authorized(
        self, request: Request, route: Route, mapped: UpstreamRequest, exchange: Exchange
    ) -> IResponse:
        """Send with the proxy's credentials (answering a challenge once) or the client's."""
        proxy_held = self.auth.configured(route)
        if proxy_held:
            authorization = await self.auth.authorization(route, mapped.scope)
        else:
            # Without proxy-held credentials the client's own go to the registry (only).
            client_auth = request.requestHeaders.getRawHeaders(b"authorization")
            authorization = client_auth[0] if client_auth else None
        response = await self._send(route, mapped, authorization, exchange)
        if response.code != 401 or not proxy_held:
            return response
        item = self.auth.plan(route, response.headers.getRawHeaders(b"www-authenticate", []))
        if item is None:
            # Nothing the proxy may answer: the client sees the challenge, as without
            # proxy-held credentials, and may answer it itself through /_token.
            return response
        # Read off the 401 first, so its connection goes back to the pool even if the
        # client leaves while the proxy fetches a token.
        self.upstream.discard(response)
        retry = await self.auth.answer(route, mapped.scope, item)
        response = await self._send(route, mapped, retry, exchange)
        if response.code == 401:
            # The proxy holds the credentials and they were refused: a challenge pointing
            # the client at /_token would ask for something it cannot give.
            self.upstream.discard(response)
            self.auth.log.warn(
                "route {route}: upstream refused the proxy's credentials for {scope}",
                route=route.name,
                scope=mapped.scope,
            )
            raise OCIError(
                "DENIED",
                "the upstream registry refused the proxy's credentials",
                {"route": route.name},
            )
        return response

    async def _send(
        self,
        route: Route,
        mapped: UpstreamRequest,
        authorization: bytes | None,
        exchange: Exchange,
    ) -> IResponse:
        sent = mapped.headers.copy()
        if authorization is not None:
            sent.setRawHeaders(b"authorization", [authorization])
        return await send(
            self.upstream, exchange, mapped.method, mapped.url, headers=sent, route=route.name
        )

    async def _follow(
        self, mapped: UpstreamRequest, response: IResponse, route: Route, exchange: Exchange
    ) -> tuple[IResponse, str]:
        """Fetch a blob redirect inside the proxy, never sending credentials along."""
        url = mapped.url
        for _ in range(MAX_REDIRECTS):
            location = response.headers.getRawHeaders(b"location")
            if response.code not in REDIRECT_STATUSES or not location:
                return response, url
            self.upstream.discard(response)
            url = urljoin(url, location[0].decode("latin-1"))
            try:
                check_scheme(route.upstream, url)
            except RedirectRefused as refused:
                exchange.error_kind = "redirect_refused"
                raise UpstreamFailure(FailureKind.REDIRECT_REFUSED, str(refused)).oci() from None
            # Pre-signed storage URLs carry their own authority: send them no Authorization.
            response = await send(
                self.upstream,
                exchange,
                mapped.method,
                url,
                headers=mapped.headers.copy(),
                route=route.name,
                http=self.follow_http.get(route.name),
            )
        raise OCIError("UPSTREAM_UNAVAILABLE", "too many upstream redirects")

    def _range_not_satisfiable(self, response: IResponse) -> None:
        """A well-formed 416 whatever the upstream sent.

        distribution answers a range past the end of a small blob with the blob's
        Content-Length and a short body, which would leave the client waiting for bytes
        that never come; the size it states is all that is kept.
        """
        content_range = response.headers.getRawHeaders(b"content-range", [b""])[0]
        match = _SIZE.fullmatch(content_range.strip())
        size = match.group(1) if match else None
        length = self.upstream.known_length(response)
        if size is None and length is not None:
            size = b"%d" % length
        # Its body may be shorter than it says: close that connection, do not pool it.
        self.upstream.abandon(response)
        raise OCIError(
            "RANGE_INVALID",
            "the requested range is not satisfiable",
            status=416,
            headers=((b"content-range", b"bytes */" + size),) if size is not None else (),
        )


class _CacheOps:
    """The cache's way upstream for one request: as the forwarder sends (credentials,
    redirects followed without them), for the whole object, headers rewritten."""

    def __init__(
        self,
        forwarder: Forwarder,
        request: Request,
        route: Route,
        mapped: UpstreamRequest,
        rewriter: ResponseRewriter,
        exchange: Exchange,
    ) -> None:
        self._forwarder = forwarder
        self._request = request
        self._route = route
        self._mapped = mapped
        self._rewriter = rewriter
        self._exchange = exchange

    async def send(self, method: str, url: str) -> IResponse:
        headers = self._mapped.headers.copy()
        for name in WHOLE_OBJECT_DROPS:
            headers.removeHeader(name)
        mapped = attrs.evolve(self._mapped, method=method, url=url, headers=headers)
        forwarder = self._forwarder
        response = await forwarder._authorized(self._request, self._route, mapped, self._exchange)
        if response.code in REDIRECT_STATUSES:
            # The cache needs the bytes itself, whatever the route does with redirects.
            response, _ = await forwarder._follow(mapped, response, self._route, self._exchange)
        return response

    def copy_headers(self, response: IResponse) -> None:
        for name, values in self._rewriter.headers(response.headers):
            self._request.responseHeaders.setRawHeaders(name, values)
