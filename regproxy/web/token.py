"""``/_token``: the client's token request, forwarded to the upstream realm with every
repository scope rewritten to the upstream's (prefixed) name, pull only."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode

from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..config import Route
from ..errors import OCIError
from ..forward import relay, send
from ..rewrite import ResponseRewriter
from ..scope import rewrite_up
from ..upstream.client import UpstreamClient, user_agent
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
        upstream: UpstreamClient,
        public_base: Callable[[Request], str],
    ) -> None:
        super().__init__()
        self.route_for = route_for
        self.realms = realms
        self.upstream = upstream
        self.public_base = public_base

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
        outgoing = Headers({b"user-agent": [user_agent(request.getRequestHostname())]})
        for name in (b"authorization", b"accept"):
            values = request.requestHeaders.getRawHeaders(name)
            if values:
                outgoing.setRawHeaders(name, values)
        if body:
            outgoing.setRawHeaders(b"content-type", [FORM])
        exchange = exchange_of(request)
        try:
            response = await send(
                self.upstream,
                exchange,
                request.method.decode("ascii"),
                url,
                headers=outgoing,
                route=route.name,
                body=body if request.method == b"POST" else None,
            )
        except OCIError:
            # Perhaps the realm moved: learn it again next time. (A client that leaves
            # raises CancelledError instead, and forgets nothing.)
            self.realms.forget(route)
            raise
        if response.code >= 500:
            self.realms.forget(route)
        rewriter = ResponseRewriter(
            route=route, target=None, upstream_url=url, public_base=self.public_base(request)
        )
        await relay(request, response, rewriter, self.upstream, exchange, has_body=True)
