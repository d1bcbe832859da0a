"""Liveness and readiness: neither looks at the upstream.

If readiness followed the upstream, an upstream outage would take every replica out of
its load balancer and turn clear 502 answers into refused connections.
"""

from __future__ import annotations

import attrs
from twisted.web.resource import Resource
from twisted.web.server import Request


@attrs.define
class Readiness:
    draining: bool = False


class Health(Resource):
    isLeaf = True

    def __init__(self, readiness: Readiness | None = None) -> None:
        super().__init__()
        self.readiness = readiness

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self.readiness is not None and self.readiness.draining:
            request.setResponseCode(503)
            return b"draining\n"
        return b"ok\n"

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)
