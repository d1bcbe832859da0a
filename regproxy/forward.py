"""Forwarding one validated registry request upstream and relaying the answer.

The steps: build the upstream request (prefixed name, allowed headers, credentials), send
it with treq (pooled, unbuffered, no automatic redirects), rewrite what names the upstream
(challenges, Location, Link, repository names in small JSON bodies), then stream the body
to the client through :class:`~regproxy.relay.BodyRelay`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from . import bodies, headers
from .config import BlobRedirects, Route
from .errors import OCIError
from .observe import Exchange
from .reference import Kind, RegistryPath, validate_name, validate_tag
from .relay import relay_response

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
USER_AGENT = b"regproxy/0.1"


class Discard(Protocol):
    """Reads a body nobody needs, so the pooled connection can be reused."""


# (route, scope, challenges from a 401) -> an Authorization value to retry with, or None.
ChallengeAnswerer = Callable[[Route, str, list[bytes]], Awaitable[bytes | None]]
# (route, scope) -> the Authorization value to send on the first try, or None.
CredentialLookup = Callable[[Route, str], Awaitable[bytes | None]]


def _never(*args: Any) -> Awaitable[bytes | None]:
    async def nothing() -> bytes | None:
        return None

    return nothing()


def upstream_query(target: RegistryPath, route: Route, raw_query: bytes) -> str:
    """Validate the pagination parameters and map catalog names to the upstream's."""
    try:
        pairs = parse_qsl(raw_query.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise OCIError("REQUEST_INVALID", "malformed query string") from None
    out = []
    for key, value in pairs:
        if key == "n" and not (value.isascii() and value.isdigit() and len(value) <= 6):
            raise OCIError("PAGINATION_NUMBER_INVALID", "n must be a non-negative integer")
        if key == "last" and value and target.kind is Kind.TAGS:
            validate_tag(value)
        if key == "last" and value and target.kind is Kind.CATALOG:
            value = route.upstream_name(validate_name(value)) if route.prefix else value
        out.append((key, value))
    if target.kind is Kind.CATALOG and route.prefix and not dict(out).get("last"):
        # Names under "prefix/" sort right after it: start there rather than at the top.
        out = [(key, value) for key, value in out if key != "last"]
        out.append(("last", route.prefix + "/"))
    return urlencode(out)


def scope_for(target: RegistryPath, route: Route) -> str:
    if target.kind is Kind.CATALOG:
        return "registry:catalog:*"
    if target.kind is Kind.BASE:
        return ""
    return f"repository:{route.upstream_name(target.name)}:pull"


class Forwarder:
    log = Logger()

    def __init__(
        self,
        *,
        client: HTTPClient,
        clock: IReactorTime,
        public_base: Callable[[Request], str],
        upstream_timeout: float,
        idle_timeout: float,
        credentials: CredentialLookup = _never,
        answer_challenge: ChallengeAnswerer = _never,
    ) -> None:
        self.client = client
        self.clock = clock
        self.public_base = public_base
        self.upstream_timeout = upstream_timeout
        self.idle_timeout = idle_timeout
        self.credentials = credentials
        self.answer_challenge = answer_challenge

    async def forward(
        self, request: Request, route: Route, target: RegistryPath, exchange: Exchange
    ) -> None:
        method = request.method.decode("ascii")
        headers.validate_range(request.requestHeaders)
        query = upstream_query(target, route, request.uri.partition(b"?")[2])
        url = route.upstream.origin + target.path(route.upstream_name(target.name))
        if query:
            url += "?" + query
        host = request.getRequestHostname().decode("ascii", "replace")
        outgoing = headers.upstream_request_headers(
            request.requestHeaders,
            USER_AGENT + b" customDomain/" + host.encode("ascii", "replace"),
        )
        scope = scope_for(target, route)
        proxy_held = route.credentials.configured
        if proxy_held:
            authorization = await self.credentials(route, scope)
        else:
            # Without proxy-held credentials the client's own go to the registry (only).
            client_auth = request.requestHeaders.getRawHeaders(b"authorization")
            authorization = client_auth[0] if client_auth else None
        response = await self._send(method, url, outgoing, authorization, exchange)
        if response.code == 401 and proxy_held:
            challenges = response.headers.getRawHeaders(b"www-authenticate", [])
            # Read off the 401 first, so its connection goes back to the pool even if the
            # client leaves while the proxy fetches a token.
            response.deliverBody(Discard())
            retry = await self.answer_challenge(route, scope, challenges)
            if retry is not None:
                response = await self._send(method, url, outgoing, retry, exchange)
            if response.code == 401:
                # The client must not see the upstream's challenge: it is the proxy's to answer.
                if retry is not None:
                    response.deliverBody(Discard())
                exchange.upstream_status = 401
                self.log.warn(
                    "route {route}: upstream refused the proxy's credentials for {scope}",
                    route=route.name,
                    scope=scope,
                )
                raise OCIError(
                    "DENIED",
                    "the upstream registry refused the proxy's credentials",
                    {"route": route.name},
                )
        if (
            route.blob_redirects is BlobRedirects.FOLLOW
            and target.kind is Kind.BLOB
            and response.code in REDIRECT_STATUSES
        ):
            response, url = await self._follow(method, url, response, outgoing, route, exchange)
        exchange.upstream_status = response.code
        await self._relay(request, route, target, url, response, exchange)

    async def _send(
        self,
        method: str,
        url: str,
        outgoing: Headers,
        authorization: bytes | None,
        exchange: Exchange,
    ) -> IResponse:
        sent = outgoing.copy()
        if authorization is not None:
            sent.setRawHeaders(b"authorization", [authorization])
        started = self.clock.seconds()
        try:
            response: IResponse = await self.client.request(
                method,
                url,
                headers=sent,
                allow_redirects=False,
                unbuffered=True,
                timeout=self.upstream_timeout,
                reactor=self.clock,  # type: ignore[arg-type]
            )
        except CancelledError:
            if exchange.error_kind == "client_gone":
                raise
            exchange.error_kind = "timeout"
            raise OCIError(
                "UPSTREAM_TIMEOUT", "the upstream registry did not answer in time"
            ) from None
        except (ConnectError, DNSLookupError, TimeoutError) as failure:
            exchange.error_kind = "connect"
            raise OCIError(
                "UPSTREAM_UNAVAILABLE",
                "the upstream registry cannot be reached",
                {"reason": type(failure).__name__},
            ) from None
        except ResponseFailed as failure:
            exchange.error_kind = "tls" if "SSL" in repr(failure.reasons) else "protocol"
            raise OCIError(
                "UPSTREAM_UNAVAILABLE",
                "the upstream registry connection failed",
                {"reason": exchange.error_kind},
            ) from None
        except Exception as failure:
            exchange.error_kind = "other"
            self.log.failure("upstream request failed", failure=None)
            raise OCIError(
                "UPSTREAM_UNAVAILABLE", "the upstream registry request failed"
            ) from failure
        exchange.upstream_seconds = self.clock.seconds() - started
        return response

    async def _follow(
        self,
        method: str,
        url: str,
        response: IResponse,
        outgoing: Headers,
        route: Route,
        exchange: Exchange,
    ) -> tuple[IResponse, str]:
        """Fetch a blob redirect inside the proxy, never sending credentials to other hosts."""
        for _ in range(MAX_REDIRECTS):
            location = response.headers.getRawHeaders(b"location")
            if response.code not in REDIRECT_STATUSES or not location:
                return response, url
            response.deliverBody(Discard())
            url = urljoin(url, location[0].decode("latin-1"))
            if urlsplit(url).scheme not in ("http", "https"):
                raise OCIError("UPSTREAM_UNAVAILABLE", "upstream redirected to an unusable URL")
            # Pre-signed storage URLs carry their own authority: send them no Authorization.
            response = await self._send(method, url, outgoing, None, exchange)
        raise OCIError("UPSTREAM_UNAVAILABLE", "too many upstream redirects")

    async def _relay(
        self,
        request: Request,
        route: Route,
        target: RegistryPath,
        url: str,
        response: IResponse,
        exchange: Exchange,
    ) -> None:
        status = response.code
        request.setResponseCode(status, response.phrase)
        upstream_headers = response.headers
        client_name = self._client_name(route, target)
        rewriter = headers.URLRewriter(
            route.upstream.origin, url, self.public_base(request), client_name
        )
        for name, values in headers.response_headers(upstream_headers):
            lower = name.lower()
            if lower == b"www-authenticate":
                realm = self.public_base(request) + "/_token"
                values = [
                    v.encode("latin-1")
                    for v in headers.rewrite_challenges(
                        [v.decode("latin-1") for v in values],
                        realm,
                        client_name,
                        bodies.prefix_scrubber(
                            route.prefix,
                            (route.upstream_name(target.name), target.name)
                            if target.name
                            else None,
                        ),
                    )
                ]
            elif lower == b"location":
                values = [rewriter.location(v.decode("latin-1")).encode("latin-1") for v in values]
            elif lower == b"link":
                values = [rewriter.link(v.decode("latin-1")).encode("latin-1") for v in values]
            request.responseHeaders.setRawHeaders(name, values)

        rewrite = self._body_rewrite(request, route, target, response)
        if request.method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
            # For HEAD, twisted keeps the upstream's Content-Length among the headers; it
            # is wrong for a body the proxy would rewrite, and that length is unknown.
            if rewrite is not None:
                request.responseHeaders.removeHeader(b"content-length")
            response.deliverBody(Discard())
            request.finish()
            return
        if rewrite is None:
            await relay_response(
                request,
                response,
                clock=self.clock,
                idle_timeout=self.idle_timeout,
                exchange=exchange,
            )
            return
        limit = bodies.LIST_BODY_LIMIT if status == 200 else bodies.ERROR_BODY_LIMIT
        body = rewrite(await bodies.read_bounded(response, limit, self.clock, self.idle_timeout))
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _client_name(self, route: Route, target: RegistryPath) -> Callable[[str], str | None]:
        """Map upstream names back, preferring the exact spelling this client used."""
        asked = route.upstream_name(target.name) if target.name else None

        def client_name(upstream_name: str) -> str | None:
            if asked is not None and upstream_name == asked:
                return target.name
            return route.client_name(upstream_name)

        return client_name

    def _body_rewrite(
        self, request: Request, route: Route, target: RegistryPath, response: IResponse
    ) -> Callable[[bytes], bytes] | None:
        """How the body must change, or None to stream it untouched (the usual case)."""
        status = response.code
        if status == 200 and target.kind is Kind.TAGS:
            return lambda body: bodies.rewrite_tags(body, target.name)
        if status == 200 and target.kind is Kind.CATALOG and route.prefix:

            def catalog(body: bytes) -> bytes:
                rewritten, ran_past = bodies.rewrite_catalog(body, route.client_name)
                if ran_past:
                    request.responseHeaders.removeHeader(b"link")
                return rewritten

            return catalog
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if status >= 400 and b"json" in content_type:
            names = (route.upstream_name(target.name), target.name) if target.name else None
            scrub = bodies.prefix_scrubber(route.prefix, names)
            if scrub is not None:
                return lambda body: bodies.rewrite_errors(body, scrub)
        return None
