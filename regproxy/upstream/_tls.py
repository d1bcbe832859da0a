"""TLS to upstreams: the standard library's ``ssl`` (``regproxy.tls.layer``) over TCP.

The CPU of a TLS blob relay is about half what it was over Twisted's pyOpenSSL layer
(docs/benchmarks.rst, "TLS upstreams through the standard library").

Verification is the standard library's: ``ssl.create_default_context`` (certificates
required, host name checked, TLS 1.2 at least) with the platform's trust store, plus an
operator's PEM bundle in addition to it. No ALPN is offered, as Twisted's client offers
none: without it every server speaks HTTP/1.1, and some (Twisted's own TLS server among
them) answer an ALPN offer they have no protocol for with an alert.

A connection's end without the server's ``close_notify`` is reported as a lost
connection, never a clean one, so a body delimited by the connection's end cannot be
truncated by an attacker on the path.
"""

from __future__ import annotations

import ssl
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from zope.interface import implementer

from ..tls.layer import TLSLayer


def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """The platform's trust, plus ``ca_file`` (PEM) in addition to it; verifying.

    A file that holds no certificate fails here, at start-up, not at the first request.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        with open(ca_file, encoding="ascii", errors="replace") as handle:
            if "-----BEGIN CERTIFICATE-----" not in handle.read():
                raise ValueError(f"{ca_file!r} holds no PEM certificate")
        context.load_verify_locations(cafile=ca_file)
    return context


class _TLSFactory(Factory):
    noisy = False

    def __init__(self, endpoint: TLSEndpoint, wrapped: IProtocolFactory) -> None:
        self._endpoint = endpoint
        self._wrapped = wrapped

    def buildProtocol(self, addr: Any) -> TLSLayer | None:
        inner = self._wrapped.buildProtocol(addr)
        if inner is None:
            return None
        endpoint = self._endpoint
        return TLSLayer(
            endpoint.context,
            inner,
            hostname=endpoint.hostname,
            session=endpoint.session,
            on_session=endpoint.remember_session,
        )


@implementer(IStreamClientEndpoint)
class TLSEndpoint:
    """Connects through ``tcp`` and speaks TLS to ``hostname`` (SNI and verification);
    the connection's Deferred fires with the wrapped protocol, as Twisted's
    ``wrapClientTLS`` does."""

    def __init__(self, context: ssl.SSLContext, hostname: str, tcp: IStreamClientEndpoint) -> None:
        self.context = context
        self.hostname = hostname
        self._tcp = tcp
        # The newest resumable session with this origin: a new connection (the pool grew,
        # or its connections aged out) resumes it instead of a full handshake, sparing the
        # certificate chain and its verification on both sides.
        self.session: ssl.SSLSession | None = None

    def remember_session(self, session: ssl.SSLSession) -> None:
        self.session = session

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        connecting: Deferred[Any] = self._tcp.connect(_TLSFactory(self, factory))
        return connecting.addCallback(lambda tls: tls.wrapped)
