"""Following blob redirects inside the proxy (``--blob-redirects follow``) without SSRF.

A redirect's ``Location`` is chosen by the upstream, or by whoever can influence it; a
proxy that fetches any URL it is handed can be pointed at the cloud metadata address,
its own loopback services or a private network. So a redirect is followed only

* over https (or http when the upstream itself is plain http), and
* to a host whose every resolved address is public, unless the upstream's own address
  is of the same kind (a registry on loopback redirecting to storage on loopback).

The address check happens in the endpoint, after resolution and before any connection,
and the connection goes to the address that was checked: a name that resolves once to
a public address and then to a private one cannot slip through.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IProtocolFactory,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from ..config import Upstream
from ._tls import TLSEndpoint
from .client import RedirectRefused

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the addresses it resolves to.
Resolve = Callable[[str, int], Deferred[list[str]]]


def address_kind(address: Address) -> str | None:
    """The non-public kind of an address, or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_private or address.is_reserved or not address.is_global:
        return "private"
    return None


def check_scheme(upstream: Upstream, url: str) -> None:
    """https only, or http when the upstream itself is reached over http."""
    scheme = urlsplit(url).scheme.lower()
    allowed = ("https", "http") if upstream.scheme == "http" else ("https",)
    if scheme not in allowed:
        raise RedirectRefused(f"{scheme or 'no'} scheme for a redirect from an https upstream")


def check_addresses(target: list[str], upstream: list[str]) -> Address:
    """The address to connect to, if every one the target resolves to is acceptable."""
    if not target:
        raise RedirectRefused("the redirect host does not resolve")
    allowed = {address_kind(ipaddress.ip_address(a)) for a in upstream} - {None}
    parsed = [ipaddress.ip_address(a) for a in target]
    for address in parsed:
        kind = address_kind(address)
        if kind is not None and kind not in allowed:
            raise RedirectRefused(f"the redirect host resolves to a {kind} address")
    return parsed[0]


@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self, done: Deferred[list[str]]) -> None:
        self._done = done
        self._addresses: list[str] = []

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self._addresses.append(address.host)

    def resolutionComplete(self) -> None:
        self._done.callback(self._addresses)


def reactor_resolver(reactor: Any) -> Resolve:
    """Resolution through the reactor's own (public) name resolver."""

    def resolve(host: str, port: int) -> Deferred[list[str]]:
        done: Deferred[list[str]] = Deferred()
        reactor.nameResolver.resolveHostName(_Collect(done), host, port)
        return done

    return resolve


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    def __init__(self, factory: GuardedEndpoints, uri: URI) -> None:
        self._factory = factory
        self._uri = uri

    def connect(self, protocol_factory: IProtocolFactory) -> Deferred[Any]:
        from twisted.internet.defer import ensureDeferred

        return ensureDeferred(self._connect(protocol_factory))

    async def _connect(self, protocol_factory: IProtocolFactory) -> Any:
        owner = self._factory
        host = self._uri.host.decode("ascii")
        target = await owner.resolve(host, self._uri.port)
        upstream = await owner.resolve(owner.upstream.host, 443)
        address = check_addresses(target, upstream)
        endpoint_type = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
        endpoint: IStreamClientEndpoint = endpoint_type(
            owner.reactor, str(address), self._uri.port, timeout=owner.connect_timeout
        )
        if self._uri.scheme == b"https":
            # Verified against the name in the URL, while connecting to the checked address.
            endpoint = TLSEndpoint(owner.tls, host, endpoint)
        return await endpoint.connect(protocol_factory)


@implementer(IAgentEndpointFactory)
class GuardedEndpoints:
    """Endpoints for redirect targets that refuse non-public addresses before connecting."""

    def __init__(
        self,
        reactor: Any,
        *,
        upstream: Upstream,
        tls: ssl.SSLContext,
        resolve: Resolve | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.reactor = reactor
        self.upstream = upstream
        self.tls = tls
        self.resolve = resolve or reactor_resolver(reactor)
        self.connect_timeout = connect_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        check_scheme(self.upstream, uri.toBytes().decode("ascii", "replace"))
        return _CheckedEndpoint(self, uri)
