"""Writing the proxy's own answers: OCI errors and small JSON documents."""

from __future__ import annotations

from twisted.web.server import Request

from ..protocol.errors import OCIError

API_VERSION_HEADER = b"docker-distribution-api-version"
API_VERSION = b"registry/2.0"


def write_body(request: Request, status: int, body: bytes, content_type: bytes) -> None:
    """Answer with a complete small body (never a relayed one), unless the client left."""
    # Request.connectionLost drops the channel: nobody is left to answer.
    if request.finished or request.channel is None:
        return
    request.setResponseCode(status)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % len(body))
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def write_error(request: Request, error: OCIError, allow: bytes = b"GET, HEAD") -> None:
    if error.status == 405:
        request.setHeader(b"allow", allow)
    for name, value in error.headers:
        request.setHeader(name, value)
    write_body(request, error.status, error.body(), b"application/json; charset=utf-8")
