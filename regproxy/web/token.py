"""``/_token``: the client's token request, forwarded to the upstream realm with every
repository scope rewritten to the upstream's (prefixed) name, pull only."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode

from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .. import bodies, headers
from ..config import Route
from ..errors import OCIError
from ..forward import USER_AGENT
from ..relay import relay_response
from ..scope import rewrite_up
from ..upstream.realm import RealmCache
from .registry import exchange_of, run_async
from .respond import write_error

FORM = b"application/x-www-form-urlencoded"


def _rewrite_pairs(
    pairs: list[tuple[str, str]], route: Route, form: bool
) -> list[tuple[str, str]]:
    """Rewrite every scope; GET repeats the parameter, the OAuth2 form space-separates."""
    scopes = rewrite_up([v for k, v in pairs if k == "scope"], route.upstream_name)
    out = [(k, v) for k, v in pairs if k != "scope"]
    if form:
        if scopes:
            out.append(("scope", " ".join(scopes)))
    else:
        out.extend(("scope", scope) for scope in scopes)
    return out


class TokenProxy(Resource):
    isLeaf = True
    log = Logger()

    def __init__(
        self,
        *,
        route_for: Callable[[Request], Route],
        realms: RealmCache,
        client: HTTPClient,
        clock: IReactorTime,
        timeout: float,
        idle_timeout: float,
    ) -> None:
        super().__init__()
        self.route_for = route_for
        self.realms = realms
        self.client = client
        self.clock = clock
        self.timeout = timeout
        self.idle_timeout = idle_timeout

    def render(self, request: Request) -> int:
        request.defaultContentType = None
        exchange = exchange_of(request)
        exchange.endpoint = "token"
        if request.method not in (b"GET", b"POST"):
            write_error(
                request, OCIError("UNSUPPORTED", "use GET or POST for tokens"), allow=b"GET, POST"
            )
            return NOT_DONE_YET
        route = self.route_for(request)
        exchange.route = route.name
        return run_async(request, lambda: self._token(request, route), self.log)

    async def _token(self, request: Request, route: Route) -> None:
        try:
            query = parse_qsl(
                request.uri.partition(b"?")[2].decode("utf-8"), keep_blank_values=True
            )
            body = b""
            if request.method == b"POST":
                content_type = request.requestHeaders.getRawHeaders(b"content-type", [b""])[0]
                if not content_type.split(b";")[0].strip().lower() == FORM:
                    raise OCIError("REQUEST_INVALID", "token POST must be a form")
                assert request.content is not None
                request.content.seek(0)
                form = parse_qsl(request.content.read().decode("utf-8"), keep_blank_values=True)
                body = urlencode(_rewrite_pairs(form, route, form=True)).encode("ascii")
        except UnicodeDecodeError:
            raise OCIError("REQUEST_INVALID", "malformed token request") from None
        realm = await self.realms.realm(route)
        if realm is None:
            raise OCIError("NOT_FOUND", "the upstream registry does not use token authentication")
        url = realm.url
        rewritten = urlencode(_rewrite_pairs(query, route, form=False))
        if rewritten:
            url += ("&" if "?" in url else "?") + rewritten
        host = request.getRequestHostname()
        outgoing = Headers({b"user-agent": [USER_AGENT + b" customDomain/" + host]})
        for name in (b"authorization", b"accept"):
            values = request.requestHeaders.getRawHeaders(name)
            if values:
                outgoing.setRawHeaders(name, values)
        if body:
            outgoing.setRawHeaders(b"content-type", [FORM])
        try:
            response = await self.client.request(
                request.method.decode("ascii"),
                url,
                headers=outgoing,
                data=body or None,
                allow_redirects=False,
                unbuffered=True,
                timeout=self.timeout,
                reactor=self.clock,  # type: ignore[arg-type]
            )
        except Exception:
            self.realms.forget(route)
            raise OCIError(
                "UPSTREAM_UNAVAILABLE", "the upstream token service cannot be reached"
            ) from None
        exchange = exchange_of(request)
        exchange.upstream_status = response.code
        if response.code >= 500:
            # Perhaps the realm moved: learn it again next time.
            self.realms.forget(route)
        request.setResponseCode(response.code, response.phrase)
        for name, values in headers.response_headers(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        scrub = bodies.prefix_scrubber(route.prefix, None)
        if response.code >= 400 and b"json" in content_type and scrub is not None:
            # Error bodies of token services name the resource they refused.
            body = bodies.rewrite_errors(
                await bodies.read_bounded(
                    response, bodies.ERROR_BODY_LIMIT, self.clock, self.idle_timeout
                ),
                scrub,
                any_json=True,
            )
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()
            return
        await relay_response(
            request, response, clock=self.clock, idle_timeout=self.idle_timeout, exchange=exchange
        )
