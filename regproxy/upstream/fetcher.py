"""The upstream as a :class:`~regproxy.protocol.fetch.Fetcher`: one validated registry
request mapped (:mod:`regproxy.protocol.mapping`), sent with the right credentials, blob redirects
followed where the route says so, and the answer rewritten for the client
(:mod:`regproxy.protocol.rewrite`).

The decisions that need the upstream's answer live here: answering its challenge with the
proxy's own credentials, following a blob redirect without them, a well-formed 416.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import quote, urljoin

import attrs
from treq.client import HTTPClient
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from ..config import BlobRedirects, Route
from ..protocol import bodies
from ..protocol.errors import OCIError
from ..protocol.fetch import Answer, Body, BytesBody, RegistryRequest
from ..protocol.mapping import UpstreamRequest, map_request
from ..protocol.reference import Kind
from ..protocol.rewrite import ResponseRewriter
from .auth import UpstreamAuth
from .body import UpstreamBody
from .client import FailureKind, RedirectRefused, UpstreamClient, UpstreamFailure
from .redirects import check_scheme

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# A cache fetches whole objects: Range is its business with its own clients.
WHOLE_OBJECT_DROPS = (b"range", b"if-range")
MAX_REDIRECTS = 5
_SIZE = re.compile(rb"bytes \*/(\d{1,19})")
_LAST = re.compile(rb"([?&]last=)[^&>]*")


def set_last(link: bytes, last: str) -> bytes:
    """A _catalog Link whose cursor is ``last`` (the last name this client was shown)."""
    return _LAST.sub(lambda m: m.group(1) + quote(last, safe="").encode(), link)


@attrs.define
class Exchanged:
    """What the upstream exchanges of one fetch came to, for the request record."""

    status: int | None = None
    seconds: float | None = None


async def send(
    upstream: UpstreamClient,
    exchanged: Exchanged,
    method: str,
    url: str,
    *,
    headers: Headers,
    route: str,
    body: bytes | None = None,
    http: HTTPClient | None = None,
) -> IResponse:
    """Send through the upstream client; a failure becomes the OCI error the client gets."""
    started = upstream.clock.seconds()
    try:
        response = await upstream.send(
            method, url, headers=headers, route=route, body=body, http=http
        )
    except UpstreamFailure as failure:
        raise failure.oci() from None
    exchanged.seconds = upstream.clock.seconds() - started
    exchanged.status = response.code
    return response


async def answer_of(
    upstream: UpstreamClient,
    response: IResponse,
    rewriter: ResponseRewriter,
    exchanged: Exchanged,
    *,
    method: bytes,
    has_body: bool,
) -> Answer:
    """The client's answer to an upstream response: headers rewritten, body streamed (or
    read whole and rewritten, for the small bodies that name repositories).

    ``has_body``: whether the upstream answer carries one (not for a HEAD sent as HEAD,
    nor for statuses that never have one).
    """
    status = response.code
    headers = Headers()

    def answer(body: Body | None) -> Answer:
        return Answer(status, headers, body, response.phrase, exchanged.status, exchanged.seconds)

    for name, values in rewriter.headers(response.headers):
        headers.setRawHeaders(name, values)
    content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
    rewrite = rewriter.body(status, content_type)
    if not has_body:
        if rewrite is not None:
            # The upstream's Content-Length describes its own body, not the rewritten one
            # a GET gets: no length is better than a wrong one. (HEADs on list endpoints
            # avoid this: they go upstream as GETs.)
            headers.removeHeader(b"content-length")
        upstream.discard(response)
        return answer(None)
    if rewrite is None:
        if method == b"HEAD":
            length = upstream.known_length(response)
            if length is not None:
                headers.setRawHeaders(b"content-length", [b"%d" % length])
            upstream.abandon(response)
            return Answer(
                status, headers, None, response.phrase, exchanged.status, exchanged.seconds
            )
        body = UpstreamBody(response, upstream.clock, upstream.idle_timeout)
        return answer(body)
    limit = bodies.LIST_BODY_LIMIT if status == 200 else bodies.ERROR_BODY_LIMIT
    rewritten = rewrite(await upstream.read(response, limit))
    if rewritten.drop_link:
        headers.removeHeader(b"link")
    elif rewritten.link_last is not None:
        links = headers.getRawHeaders(b"link") or []
        headers.setRawHeaders(b"link", [set_last(link, rewritten.link_last) for link in links])
    headers.removeHeader(b"content-length")
    return Answer(
        status,
        headers,
        BytesBody(rewritten.body),
        response.phrase,
        exchanged.status,
        exchanged.seconds,
    )


class UpstreamFetcher:
    """Answers registry requests of any route from its upstream, through the one client."""

    def __init__(
        self,
        *,
        upstream: UpstreamClient,
        auth: UpstreamAuth,
        follow_http: Mapping[str, HTTPClient] | None = None,
    ) -> None:
        self.upstream = upstream
        self.auth = auth
        # Per route: redirect targets are fetched through endpoints that refuse non-public
        # addresses (tests of the follow logic hand in their in-memory client).
        self.follow_http = dict(follow_http or {})

    async def fetch(self, request: RegistryRequest) -> Answer:
        route = request.route
        mapped = map_request(
            method=request.method,
            target=request.target,
            route=route,
            raw_query=request.raw_query,
            client_headers=request.headers,
            client_host=request.client_host,
            mount=request.mount,
            client_target=request.client_target,
        )
        if request.whole_object:
            headers = mapped.headers.copy()
            for name in WHOLE_OBJECT_DROPS:
                headers.removeHeader(name)
            mapped = attrs.evolve(mapped, headers=headers)
        exchanged = Exchanged()
        response = await self._authorized(request, mapped, exchanged)
        url = mapped.url
        follows = request.whole_object or (
            route.blob_redirects is BlobRedirects.FOLLOW and request.target.kind is Kind.BLOB
        )
        if follows and response.code in REDIRECT_STATUSES:
            response, url = await self._follow(mapped, response, route, exchanged)
        if response.code == 416:
            self._range_not_satisfiable(response)
        rewriter = ResponseRewriter(
            mount=request.mount,
            target=request.client_target,
            upstream_name=mapped.upstream_name,
            upstream_url=url,
            public_base=request.public_base,
        )
        status = response.code
        sent_method = response.request.method if response.request is not None else b"GET"
        has_body = sent_method != b"HEAD" and status not in (204, 304) and status >= 200
        return await answer_of(
            self.upstream,
            response,
            rewriter,
            exchanged,
            method=request.method,
            has_body=has_body,
        )

    async def _authorized(
        self, request: RegistryRequest, mapped: UpstreamRequest, exchanged: Exchanged
    ) -> IResponse:
        """Send with the proxy's credentials (answering a challenge once) or the client's."""
        route = request.route
        proxy_held = self.auth.configured(route)
        if proxy_held:
            authorization = await self.auth.authorization(route, mapped.scope)
        else:
            # Without proxy-held credentials the client's own go to the registry (only).
            authorization = request.authorization
        response = await self._send(route, mapped, authorization, exchanged)
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
        response = await self._send(route, mapped, retry, exchanged)
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
        exchanged: Exchanged,
    ) -> IResponse:
        sent = mapped.headers.copy()
        if authorization is not None:
            sent.setRawHeaders(b"authorization", [authorization])
        return await send(
            self.upstream, exchanged, mapped.method, mapped.url, headers=sent, route=route.name
        )

    async def _follow(
        self, mapped: UpstreamRequest, response: IResponse, route: Route, exchanged: Exchanged
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
                raise UpstreamFailure(FailureKind.REDIRECT_REFUSED, str(refused)).oci() from None
            # Pre-signed storage URLs carry their own authority: send them no Authorization.
            response = await send(
                self.upstream,
                exchanged,
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
