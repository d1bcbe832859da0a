"""Request framing the proxy refuses before anything is forwarded: smuggling shapes.

Twisted's HTTP server accepts ``Transfer-Encoding: identity`` and then ignores the body,
whose bytes it parses as the next request on the connection; behind a front proxy that
frames the message differently that is request smuggling. So the one Transfer-Encoding
accepted is exactly ``chunked``, once, on one line (any case): anything else is a 400 and
the connection is closed. That is stricter than RFC 9112 section 6.3 (a 400 when the final
coding is not ``chunked``) on purpose: ``identity`` then ``chunked`` on two lines ends in
``chunked``, yet Twisted reads the first line as no coding at all while a front proxy may
not, and the proxy decodes no other coding anyway.

Twisted's parser refuses the other ambiguous framings before this module sees them (a
Content-Length beside a Transfer-Encoding, several Content-Length lines even if equal, one
that is not all digits, two ``chunked`` lines): ``tests/unit/web/test_framing.py`` pins those
too. A registry read (GET, HEAD) has no body at all, so one that announces one (any
Transfer-Encoding, a Content-Length other than ``0``) is refused the same way; only the
OAuth2 ``POST /_token`` form has a body, of bounded size. One well-formed Host is required
(see ``framing_error``). Folded header lines (obs-fold) are joined by Twisted with a space,
as RFC 9112 section 5.2 allows, not refused; a folded Host or Content-Length then fails the
rules above.
"""

from __future__ import annotations

from typing import Any

from twisted.web.http_headers import Headers

from ..protocol.errors import OCIError
from .public import HOST

BODYLESS_METHODS = (b"GET", b"HEAD")
REASONS = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Payload Too Large"}


def framing_error(
    method: bytes, headers: Headers, version: bytes = b"HTTP/1.1"
) -> OCIError | None:
    """Why this request's framing is refused, or None when it is acceptable."""
    hosts = headers.getRawHeaders(b"host")
    # RFC 9112 section 3.2: one Host, well formed, and required in HTTP/1.1. Host routes
    # pick the upstream (and its credentials) by it: a front proxy reading another Host
    # than regproxy would disagree with it about where the request goes.
    if hosts is None:
        if version != b"HTTP/1.0":
            return OCIError("REQUEST_INVALID", "an HTTP/1.1 request needs a Host header")
    elif len(hosts) != 1 or not HOST.fullmatch(hosts[0]):
        return OCIError("REQUEST_INVALID", "exactly one well-formed Host header is required")
    codings = headers.getRawHeaders(b"transfer-encoding")
    if codings is not None and [c.strip().lower() for c in codings] != [b"chunked"]:
        return OCIError("REQUEST_INVALID", "only Transfer-Encoding: chunked is accepted")
    if method in BODYLESS_METHODS:
        lengths = headers.getRawHeaders(b"content-length") or []
        if codings is not None or any(value.strip() != b"0" for value in lengths):
            return OCIError("REQUEST_INVALID", "GET and HEAD requests carry no body")
    return None


def refuse_and_close(transport: Any, error: OCIError, *, head: bool) -> None:
    """Answer ``error`` straight on the transport and close the connection.

    Used where no Request can answer (the framing is untrusted, so nothing after it on the
    connection may be read as another request). A HEAD answer never carries a body.
    """
    if transport is None:
        return
    body = error.body()
    reason = REASONS.get(error.status, b"Bad Request")
    transport.write(
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (error.status, reason, len(body), b"" if head else body)
    )
    transport.loseConnection()
