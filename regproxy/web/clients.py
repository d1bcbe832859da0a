"""Who is on the other end of a request: the client's address through trusted proxies, and
whether credentials may travel on this connection."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.web.server import Request

from ..access.gate import Client
from .observe import ClientAddress

_NOBODY_TRUSTED = ClientAddress(())


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def client_of(request: Request) -> Client:
    """The client's address (as the access log names it) and whether its channel is safe
    for credentials: TLS to the proxy, a trusted proxy in front saying
    ``X-Forwarded-Proto: https``, or loopback without a proxy in between."""
    site: Any = getattr(request, "site", None)
    addresses: ClientAddress = getattr(site, "client_address", None) or _NOBODY_TRUSTED
    peer = getattr(request.getClientAddress(), "host", "") or ""
    forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
    address = addresses.resolve(peer, forwarded)
    if request.isSecure():
        secure = True
    elif addresses.is_trusted(peer):
        proto = request.requestHeaders.getRawHeaders(b"x-forwarded-proto", [b""])[0]
        secure = proto.split(b",")[0].strip().lower() == b"https"
    else:
        secure = is_loopback(peer)
    return Client(address, secure)
