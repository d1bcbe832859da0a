"""``/v2/...``: the registry API, read-only, validated before anything goes upstream."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..config import Route
from ..errors import OCIError
from ..forward import Forwarder
from ..observe import Exchange
from ..reference import Kind, RegistryPath, parse_v2_path
from ..relay import abort_client
from .respond import API_VERSION, API_VERSION_HEADER, write_error

READ_METHODS = (b"GET", b"HEAD")
KEPT_ON_ERROR = (b"x-request-id", b"docker-distribution-api-version")
ENDPOINTS = {
    Kind.BASE: "base",
    Kind.CATALOG: "catalog",
    Kind.MANIFEST: "manifest",
    Kind.BLOB: "blob",
    Kind.TAGS: "tags",
    Kind.REFERRERS: "referrers",
}


def exchange_of(request: Request) -> Exchange:
    """The per-request record the access log reads; created on first use."""
    exchange: Exchange | None = getattr(request, "regproxy_exchange", None)
    if exchange is None:
        exchange = Exchange()
        request.regproxy_exchange = exchange  # type: ignore[attr-defined]
    return exchange


def run_async(request: Request, work: Callable[[], Coroutine[Any, Any, None]], log: Logger) -> int:
    """Run ``work`` for ``request``; cancel it when the client leaves; answer errors as OCI.

    Returns NOT_DONE_YET for ``render``.
    """
    exchange = exchange_of(request)
    deferred: Deferred[None] = ensureDeferred(work())

    def client_gone(_: Failure) -> None:
        # Also fires when the proxy itself cut the client off after an upstream failure:
        # that failure's kind is what the access event must say.
        if exchange.error_kind is None:
            exchange.error_kind = "client_gone"
        deferred.cancel()

    request.notifyFinish().addErrback(client_gone)

    def failed(failure: Failure) -> None:
        if failure.check(CancelledError) and exchange.error_kind == "client_gone":
            return
        error = failure.value
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


class RegistryAPI(Resource):
    """A leaf: it parses the raw path itself, since repository names contain slashes."""

    isLeaf = True
    log = Logger()

    def __init__(self, route_for: Callable[[Request], Route], forwarder: Forwarder) -> None:
        super().__init__()
        self.route_for = route_for
        self.forwarder = forwarder

    def render(self, request: Request) -> int | bytes:
        request.defaultContentType = None
        request.setHeader(API_VERSION_HEADER, API_VERSION)
        exchange = exchange_of(request)
        try:
            if request.method not in READ_METHODS:
                # Before parsing: a write is refused as such, whatever its path.
                raise OCIError(
                    "UNSUPPORTED", "this registry is read-only", {"method": "not allowed"}
                )
            target = parse_v2_path(request.path.decode("latin-1"))
            exchange.endpoint = ENDPOINTS[target.kind]
            route = self.route_for(request)
        except OCIError as error:
            write_error(request, error)
            return NOT_DONE_YET
        exchange.route = route.name
        return run_async(request, lambda: self._forward(request, route, target), self.log)

    async def _forward(self, request: Request, route: Route, target: RegistryPath) -> None:
        await self.forwarder.forward(request, route, target, exchange_of(request))
