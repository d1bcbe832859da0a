"""``/_token``: with [auth], the proxy's own token service (``regproxy.access.token_service``);
otherwise the client's token request, forwarded to the upstream realm with every
repository scope rewritten to the upstream's (prefixed) name, pull only."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..access.gate import Gate, Gates
from ..access.token_service import issue, parse_ask
from ..protocol.errors import OCIError
from ..protocol.headers import user_agent
from ..protocol.mount import Mount
from ..protocol.rewrite import ResponseRewriter
from ..upstream.fetcher import Exchanged, answer_of, send
from .answer import write_answer
from .clients import client_of
from .public import request_host
from .record import record_of
from .registry import PROXY_SERVICE, authorization_of, proxy_answers_pings, run_async, service_of
from .respond import write_body, write_error

if TYPE_CHECKING:
    from ..routing.snapshot import Routing

ANONYMOUS_TOKEN = b'{"token":"anonymous","access_token":"anonymous","expires_in":300}'

FORM = b"application/x-www-form-urlencoded"


def _rewrite_pairs(
    pairs: list[tuple[str, str]], mount: Mount, service: str | None, form: bool
) -> list[tuple[str, str]]:
    """Rewrite every scope for the mount's upstream; ``service`` passes unchanged, except
    the proxy's own (``/v2/`` answered by the proxy), which becomes the upstream's.

    GET repeats the ``scope`` parameter, the OAuth2 form space-separates.
    """
    scopes = mount.upstream_scopes([v for k, v in pairs if k == "scope"])
    out = []
    for key, value in pairs:
        if key == "scope":
            continue
        if key == "service" and value == PROXY_SERVICE:
            if not service:
                continue
            value = service
        out.append((key, value))
    if form:
        if scopes:
            out.append(("scope", " ".join(scopes)))
    else:
        out.extend(("scope", scope) for scope in scopes)
    return out


def _scopes(pairs: list[tuple[str, str]]) -> list[str]:
    return [value for key, value in pairs if key == "scope"]


class TokenProxy(Resource):
    isLeaf = True
    log = Logger()

    def __init__(
        self,
        *,
        routing: Callable[[], Routing],
        public_base: Callable[[Request], str],
        gates: Gates | None = None,
    ) -> None:
        super().__init__()
        self.routing = routing
        self.public_base = public_base
        self.gates = gates

    def render(self, request: Request) -> int:
        request.defaultContentType = None
        record = record_of(request)
        record.endpoint = "token"
        if request.method not in (b"GET", b"POST"):
            write_error(
                request, OCIError("UNSUPPORTED", "use GET or POST for tokens"), allow=b"GET, POST"
            )
            return NOT_DONE_YET
        routing = self.routing()
        gate = self.gates(routing.table) if self.gates is not None else None
        if gate is not None and gate.authenticates:
            return self._own_token(request, gate)
        try:
            query, form = self._parameters(request)
            rest = request.path.partition(b"/_token")[2].decode("ascii")
            mount = routing.table.token_mount(rest, _scopes(query) + _scopes(form or []))
        except (UnicodeDecodeError, OCIError) as error:
            if not isinstance(error, OCIError):
                error = OCIError("REQUEST_INVALID", "malformed token request")
            write_error(request, error, allow=b"GET, POST")
            return NOT_DONE_YET
        if mount is None:
            write_error(request, OCIError("NOT_FOUND", "no such token realm"), allow=b"GET, POST")
            return NOT_DONE_YET
        record.route = mount.route.name
        return run_async(
            request, lambda: self._token(request, routing, mount, query, form), self.log
        )

    def _own_token(self, request: Request, gate: Gate) -> int:
        """[auth]: the proxy signs the token itself, for what the rules admit."""
        record = record_of(request)
        try:
            query, form = self._parameters(request)
            ask = parse_ask(query, form, authorization_of(request))
        except (UnicodeDecodeError, OCIError) as error:
            if not isinstance(error, OCIError):
                error = OCIError("REQUEST_INVALID", "malformed token request")
            write_error(request, error, allow=b"GET, POST")
            return NOT_DONE_YET
        base = self.public_base(request)

        async def answer() -> None:
            issued = await issue(
                gate,
                ask,
                client=client_of(request),
                host=request_host(request),
                service=service_of(base),
            )
            record.user = issued.principal or None
            request.setHeader(b"cache-control", b"no-store")
            write_body(request, 200, issued.body, b"application/json")

        return run_async(request, answer, self.log)

    @staticmethod
    def _parameters(
        request: Request,
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None]:
        """The query's parameters, and the OAuth2 form's for a POST."""
        query = parse_qsl(request.uri.partition(b"?")[2].decode("utf-8"), keep_blank_values=True)
        if request.method != b"POST":
            return query, None
        content_type = request.requestHeaders.getRawHeaders(b"content-type", [b""])[0]
        if not content_type.split(b";")[0].strip().lower() == FORM:
            raise OCIError("REQUEST_INVALID", "token POST must be a form")
        assert request.content is not None
        request.content.seek(0)
        return query, parse_qsl(request.content.read().decode("utf-8"), keep_blank_values=True)

    async def _token(
        self,
        request: Request,
        routing: Routing,
        mount: Mount,
        query: list[tuple[str, str]],
        form: list[tuple[str, str]] | None,
    ) -> None:
        route = mount.route
        realm = await routing.realms.realm(route)
        if realm is None:
            if proxy_answers_pings(routing.table):
                # The proxy's own /v2/ answer sent this client here for a route whose
                # upstream needs no token: any token will do, the upstream ignores it.
                write_body(request, 200, ANONYMOUS_TOKEN, b"application/json")
                return
            raise OCIError("NOT_FOUND", "the upstream registry does not use token authentication")
        body = b""
        if form is not None:
            body = urlencode(_rewrite_pairs(form, mount, realm.service, form=True)).encode()
        url = realm.url
        rewritten = urlencode(_rewrite_pairs(query, mount, realm.service, form=False))
        if rewritten:
            url += ("&" if "?" in url else "?") + rewritten
        outgoing = Headers({b"user-agent": [user_agent(request.getRequestHostname())]})
        for name in (b"authorization", b"accept"):
            values = request.requestHeaders.getRawHeaders(name)
            if values:
                outgoing.setRawHeaders(name, values)
        if body:
            outgoing.setRawHeaders(b"content-type", [FORM])
        exchanged = Exchanged()
        try:
            response = await send(
                routing.upstream,
                exchanged,
                request.method.decode("ascii"),
                url,
                headers=outgoing,
                route=route.name,
                body=body if request.method == b"POST" else None,
            )
        except OCIError:
            # Perhaps the realm moved: learn it again next time. (A client that leaves
            # raises CancelledError instead, and forgets nothing.)
            routing.realms.forget(route)
            raise
        if response.code >= 500:
            routing.realms.forget(route)
        rewriter = ResponseRewriter(
            mount=mount,
            target=None,
            upstream_name=None,
            upstream_url=url,
            public_base=self.public_base(request),
        )
        answer = await answer_of(
            routing.upstream, response, rewriter, exchanged, method=request.method, has_body=True
        )
        await write_answer(request, answer)
