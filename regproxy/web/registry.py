"""``/v2/...``: the registry API, read-only, validated before anything goes upstream."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import attrs
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..access.admission import Denied, admit
from ..access.gate import Gate, Gates, Verdict
from ..protocol.errors import OCIError
from ..protocol.fetch import RegistryRequest
from ..protocol.reference import Kind, parse_v2_path
from ..routing.matching import MatchedBy, RouteMatch, RouteTable, unknown_name
from .answer import abort_client, write_answer
from .clients import client_of
from .record import record_of
from .respond import API_VERSION, API_VERSION_HEADER, write_body, write_error

if TYPE_CHECKING:
    from ..config import Route
    from ..routing.snapshot import Routing

# The service the proxy names in its own challenge; /_token replaces it with the upstream's.
PROXY_SERVICE = "regproxy"
ERROR_BODY = OCIError("UNAUTHORIZED", "authentication required").body()

READ_METHODS = (b"GET", b"HEAD")
# The rate-limit headers too: the request was counted, whatever went wrong after.
KEPT_ON_ERROR = (
    b"x-request-id",
    b"docker-distribution-api-version",
    b"ratelimit-limit",
    b"ratelimit-remaining",
)
ENDPOINTS = {
    Kind.BASE: "base",
    Kind.CATALOG: "catalog",
    Kind.MANIFEST: "manifest",
    Kind.BLOB: "blob",
    Kind.TAGS: "tags",
    Kind.REFERRERS: "referrers",
}


def run_async(request: Request, work: Callable[[], Coroutine[Any, Any, None]], log: Logger) -> int:
    """Run ``work`` for ``request``; cancel it when the client leaves; answer errors as OCI.

    Returns NOT_DONE_YET for ``render``.
    """
    record = record_of(request)
    deferred: Deferred[None] = ensureDeferred(work())

    def client_gone(_: Failure) -> None:
        # Also fires when the proxy itself cut the client off after an upstream failure:
        # that failure's kind is what the access event must say.
        if record.error_kind is None:
            record.error_kind = "client_gone"
        deferred.cancel()

    request.notifyFinish().addErrback(client_gone)

    def failed(failure: Failure) -> None:
        if failure.check(CancelledError) and record.error_kind == "client_gone":
            return
        error = failure.value
        if isinstance(error, OCIError) and error.kind is not None and record.error_kind is None:
            record.error_kind = error.kind
        if not isinstance(error, OCIError):
            log.failure("unexpected error for {path}", failure, path=request.path[:200])
            error = OCIError("UNKNOWN", "internal proxy error", status=500)
        if not request.startedWriting:
            # Headers copied from an upstream answer that is not being sent must not
            # describe this error (a Docker-Content-Digest, a Link ...).
            kept = ((name, request.responseHeaders.getRawHeaders(name)) for name in KEPT_ON_ERROR)
            request.responseHeaders = Headers({name: values for name, values in kept if values})
            write_error(request, error)
        else:
            # Part of the body is out: only dropping the connection tells the client.
            abort_client(request)

    deferred.addErrback(failed)
    return NOT_DONE_YET


def proxy_answers_pings(table: RouteTable) -> bool:
    """Whether ``/v2/`` at the top serves several upstreams (path routes), or none."""
    return table.default is None or any(route.path for route in table.routes)


def authorization_of(request: Request) -> bytes | None:
    values = request.requestHeaders.getRawHeaders(b"authorization")
    return values[0] if values else None


def service_of(base: str) -> str:
    """The proxy's own token service name: its public host (and port), as clients reach it."""
    return base.partition("://")[2]


def namespace_of(request: Request) -> str | None:
    """containerd's ``?ns=`` (the registry a mirror request is for), if any."""
    query = request.uri.partition(b"?")[2]
    if not query:
        return None
    for key, value in parse_qsl(query.decode("latin-1")):
        if key == "ns":
            return value
    return None


class RegistryAPI(Resource):
    """A leaf: it parses the raw path itself, since repository names contain slashes."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        routing: Callable[[], Routing],
        public_base: Callable[[Request], str],
        gates: Gates | None = None,
    ) -> None:
        super().__init__()
        self.routing = routing
        self.public_base = public_base
        # Access control and rate limits, when the configuration has [auth] or [limits].
        self.gates = gates

    def render(self, request: Request) -> int | bytes:
        request.defaultContentType = None
        request.setHeader(API_VERSION_HEADER, API_VERSION)
        record = record_of(request)
        routing = self.routing()
        try:
            if request.method not in READ_METHODS:
                # Before parsing: a write is refused as such, whatever its path.
                raise OCIError(
                    "UNSUPPORTED", "this registry is read-only", {"method": "not allowed"}
                )
            target = parse_v2_path(request.path.decode("latin-1"))
            record.endpoint = ENDPOINTS[target.kind]
            host = request.requestHeaders.getRawHeaders(b"host", [b""])[0].decode("latin-1")
            match = routing.table.match(host, namespace_of(request), target.name or None)
            gate = self.gates(routing.table) if self.gates is not None else None
            if target.kind is Kind.BASE and gate is not None and gate.authenticates:
                self._own_ping(request, gate)
                return NOT_DONE_YET
            if target.kind is Kind.BASE and self._answers_ping(routing, match):
                self._ping(request)
                return NOT_DONE_YET
            if match is None or not match.allowed:
                # A repository no route serves and one the allow-list hides look alike.
                raise unknown_name(target.name)
            principal = None
            if gate is not None:
                principal = self._admit(request, gate, match.route, match.name, target.name)
        except OCIError as error:
            write_error(request, error)
            return NOT_DONE_YET
        record.route = match.route.name
        asked = RegistryRequest(
            method=request.method,
            route=match.route,
            mount=match.mount,
            target=attrs.evolve(target, name=match.name),
            client_target=target,
            headers=request.requestHeaders,
            raw_query=request.uri.partition(b"?")[2],
            client_host=request.getRequestHostname(),
            base_url=lambda: self.public_base(request),
        )
        fetcher = routing.fetcher
        rate = None
        if (
            gate is not None
            and gate.limiter is not None
            and target.kind is Kind.MANIFEST
            and request.method == b"GET"
        ):
            rate = gate.rate(principal, client_of(request).address)

        async def answer() -> None:
            if rate is not None and gate is not None and gate.limiter is not None:
                verdict: Verdict = await gate.limiter.take(*rate)
                if not verdict.allowed:
                    raise OCIError(
                        "TOOMANYREQUESTS",
                        "too many manifest requests; see Retry-After",
                        headers=tuple(verdict.headers()),
                        kind="rate_limited",
                    )
                for name, value in verdict.headers():
                    request.responseHeaders.setRawHeaders(name, [value])
            await write_answer(request, await fetcher.fetch(asked))

        return run_async(request, answer, self.log)

    @staticmethod
    def _answers_ping(routing: Routing, match: RouteMatch | None) -> bool:
        """Whether the proxy answers ``/v2/`` itself rather than one upstream.

        With path routes, the top of ``/v2/`` serves several upstreams at once, and clients
        (docker, containers/image) take the token realm from this one answer and use it for
        every repository: so it must be the proxy's own realm, which sends each token
        request on to the route its scopes name.
        """
        return match is None or (
            proxy_answers_pings(routing.table) and match.by is MatchedBy.DEFAULT
        )

    def _admit(
        self, request: Request, gate: Gate, route: Route, name: str, client_name: str
    ) -> str:
        """Who is asking, if the rules admit them (else the OCIError to answer)."""
        record = record_of(request)
        authorization = authorization_of(request)
        base = self.public_base(request)
        try:
            admitted = admit(
                gate,
                route=route,
                name=name,
                client_name=client_name,
                authorization=authorization,
                client=client_of(request),
                realm=base + "/_token",
                service=service_of(base),
            )
        except Denied as denied:
            # Who was refused is what an operator looks for in the access log.
            record.user = denied.principal or None
            raise
        record.user = admitted.principal or None
        if authorization is not None and gate.authenticates:
            # The client's credentials are the proxy's own tokens: they never go upstream,
            # where the route's own credentials (or none) are used.
            request.requestHeaders.removeHeader(b"authorization")
        return admitted.principal

    def _own_ping(self, request: Request, gate: Gate) -> None:
        """``/v2/`` with [auth]: the proxy is the registry its clients authenticate to."""
        base = self.public_base(request)
        admitted = admit(
            gate,
            route=None,
            name="",
            client_name="",
            authorization=authorization_of(request),
            client=client_of(request),
            realm=base + "/_token",
            service=service_of(base),
        )
        record_of(request).user = admitted.principal or None
        write_body(request, 200, b"{}", b"application/json; charset=utf-8")

    def _ping(self, request: Request) -> None:
        realm = self.public_base(request) + "/_token"
        request.setResponseCode(401)
        request.setHeader(
            b"www-authenticate", f'Bearer realm="{realm}",service="regproxy"'.encode()
        )
        write_body(request, 401, ERROR_BODY, b"application/json; charset=utf-8")
