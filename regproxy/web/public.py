"""The proxy's public base URL, as clients reach it."""

from __future__ import annotations

import re

from twisted.web.server import Request

from ..config import Config

HOST = re.compile(
    rb"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?\.?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?"
)


def request_host(request: Request) -> str:
    """The Host the client used, when it is a well-formed host[:port]; else the listener's."""
    host = request.requestHeaders.getRawHeaders(b"host", [b""])[0]
    if HOST.fullmatch(host):
        return host.decode("ascii").lower()
    address = request.getHost()
    return f"{getattr(address, 'host', 'localhost')}:{getattr(address, 'port', 80)}"


def public_base(request: Request, config: Config) -> str:
    """``--public-url`` when given; else scheme (``X-Forwarded-Proto`` or listener) + Host.

    Derived per request, never stored across requests: behind a load balancer every
    replica answers alike. Within one request it is asked for more than once (mapping,
    then rewriting the answer), so the first answer is kept on the request.
    """
    if config.public_url:
        return config.public_url
    known: str | None = getattr(request, _KEPT, None)
    if known is not None:
        return known
    known = _derive(request)
    setattr(request, _KEPT, known)
    return known


_KEPT = "_regproxy_public_base"


def _derive(request: Request) -> str:
    proto = request.requestHeaders.getRawHeaders(b"x-forwarded-proto", [b""])[0]
    scheme = proto.split(b",")[0].strip().lower().decode("ascii", "replace")
    if scheme not in ("http", "https"):
        scheme = "https" if request.isSecure() else "http"
    return f"{scheme}://{request_host(request)}"
