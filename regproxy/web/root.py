"""The root of the resource tree."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..protocol.errors import OCIError
from .respond import write_error

if TYPE_CHECKING:
    from ..access.gate import Gates
    from ..routing.snapshot import CurrentRouting, RoutingFactory


class Root(Resource):
    """Fixed children by name; everything else goes to ``fallback`` (browser redirects)."""

    # The routing in force and how to build another (a reload); set by the service.
    routing: CurrentRouting
    routing_factory: RoutingFactory
    # The access state of each routing snapshot ([auth], [limits]).
    gates: Gates

    def __init__(self, fallback: Resource) -> None:
        super().__init__()
        self.fallback = fallback

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self.fallback

    def render(self, request: Request) -> int | bytes:
        if not request.path.startswith(b"/"):
            # An absolute-form target ("GET http://elsewhere/ HTTP/1.1"): this is no
            # forward proxy.
            write_error(request, OCIError("REQUEST_INVALID", "origin-form request targets only"))
            return NOT_DONE_YET
        result: int | bytes = self.fallback.render(request)
        return result

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if not request.path.startswith(b"/"):
            return self
        child: Resource = super().getChildWithDefault(path, request)
        return child
