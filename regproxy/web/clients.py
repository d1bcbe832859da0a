"""Who is on the other end of a request: the client's address through trusted proxies, and
whether credentials may travel on this connection."""

from __future__ import annotations

import functools
from typing import Any

from twisted.web.server import Request

from ..access.gate import Client
from .observe import ClientAddress, ip_of

_NOBODY_TRUSTED = ClientAddress(())
_KEPT = "_regproxy_client"


@functools.lru_cache(maxsize=1024)
def is_loopback(address: str) -> bool:
    ip = ip_of(address)
    return ip is not None and ip.is_loopback


def client_of(request: Request) -> Client:
    """The client's address (as the access log names it) and whether its channel is safe
    for credentials: TLS to the proxy, a trusted proxy in front saying
    ``X-Forwarded-Proto: https``, or loopback without a proxy in between."""
    channel: Any = request.channel
    known: Client | None = getattr(channel, _KEPT, None)
    if known is not None:
        return known
    site: Any = getattr(request, "site", None)
    addresses: ClientAddress = getattr(site, "client_address", None) or _NOBODY_TRUSTED
    peer = getattr(request.getClientAddress(), "host", "") or ""
    if addresses.is_trusted(peer):
        # A trusted proxy's requests each say whom they are for, and how they came.
        forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
        # What the trusted proxy added: the last value (one that appends keeps the client's
        # own in front), as X-Forwarded-For is read from the right.
        proto = request.requestHeaders.getRawHeaders(b"x-forwarded-proto", [b""])[-1]
        secure = request.isSecure() or proto.split(b",")[-1].strip().lower() == b"https"
        return Client(addresses.resolve(peer, forwarded), secure)
    # Nothing of the request counts: the same for every request of the connection.
    client = Client(peer, request.isSecure() or is_loopback(peer))
    if channel is not None:
        setattr(channel, _KEPT, client)
    return client
