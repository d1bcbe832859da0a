"""TLS to upstreams with the standard library's ``ssl`` module, over Twisted's TCP.

Twisted's TLS layer (``twisted.protocols.tls``) decrypts through pyOpenSSL, one 16 KiB
record per Python call, and hands each record's plaintext to the protocol above on its
own: a 256 KiB socket read of a blob travels the HTTP parser, the body relay and the
client's write sixteen times. Here every record of one socket read is decrypted by
``ssl.SSLObject`` (C, no cffi wrappers) and the plaintext goes up once, joined. The
protocol above sees the same transport interface; the CPU of a TLS blob relay drops by
about a third (docs/benchmarks.rst, "TLS upstreams through the standard library").

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

import contextlib
import ssl
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

# Plaintext asked of the TLS object per call; it returns at most one record's worth.
_RECORD = 64 * 1024


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


@implementer(ITransport, IPushProducer, IConsumer)
class TLSClient(Protocol):
    """TLS over a TCP connection, for the protocol it wraps: the transport that one sees."""

    def __init__(self, context: ssl.SSLContext, hostname: str, wrapped: IProtocol) -> None:
        self._context = context
        self._hostname = hostname
        self.wrapped = wrapped
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls: ssl.SSLObject | None = None
        self._handshaken = False
        self._waiting: list[bytes] = []  # written before the handshake completed
        self._error: Failure | None = None
        self._closed_cleanly = False
        self._lost = False
        self._wrapped_connected = False
        self.disconnecting = False

    # -- the TCP side ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        try:
            self._tls = self._context.wrap_bio(
                self._incoming, self._outgoing, server_hostname=self._hostname
            )
        except (ssl.SSLError, ValueError) as error:
            self._fail(error)
            return
        self._wrapped_connected = True
        self.wrapped.makeConnection(self)
        self._handshake()

    def _handshake(self) -> None:
        assert self._tls is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as error:
            self._fail(error)
            return
        self._handshaken = True
        self._flush()
        waiting, self._waiting = self._waiting, []
        for data in waiting:
            self.write(data)

    def dataReceived(self, data: bytes) -> None:
        if self._tls is None or self._error is not None:
            return
        self._incoming.write(data)
        if not self._handshaken:
            self._handshake()
            if not self._handshaken:
                return
        tls = self._tls
        pieces: list[bytes] = []
        while True:
            try:
                piece = tls.read(_RECORD)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._closed_cleanly = True
                break
            except (ssl.SSLError, OSError) as error:
                self._deliver(pieces)
                self._fail(error)
                return
            if not piece:
                break
            pieces.append(piece)
        self._flush()  # reading may answer (key updates, alerts)
        self._deliver(pieces)
        if self._closed_cleanly and self.transport is not None:
            self.transport.loseConnection()

    def _deliver(self, pieces: list[bytes]) -> None:
        if not pieces or self._lost:
            return
        self.wrapped.dataReceived(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def _flush(self) -> None:
        out = self._outgoing.read()
        if out and self.transport is not None:
            self.transport.write(out)

    def _fail(self, error: BaseException) -> None:
        """A TLS failure (a certificate that does not verify, a bad record): the connection
        ends, and the protocol above learns why (``ssl.SSLError``, a TLS failure kind)."""
        if self._error is None:
            self._error = Failure(error)
        self._flush()  # the alert, if any
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if self._lost:
            return
        self._lost = True
        if self._error is not None:
            reason = self._error
        elif reason.check(ConnectionDone) and not self._closed_cleanly and not self.disconnecting:
            reason = Failure(ConnectionLost("the upstream closed without a TLS close_notify"))
        if self._tls is None and self._error is None:
            return  # the wrapped protocol was never connected
        if not self._wrapped_connected:
            self.wrapped.makeConnection(self)
        self.wrapped.connectionLost(reason)

    # -- the transport the wrapped protocol sees --------------------------------------------

    def write(self, data: bytes) -> None:
        if self._lost or self._tls is None:
            return
        if not self._handshaken:
            self._waiting.append(data)
            return
        try:
            self._tls.write(data)
        except (ssl.SSLError, OSError) as error:
            self._fail(error)
            return
        self._flush()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        if self._handshaken:
            self._close_tls()
        elif self.transport is not None:
            # Mid-handshake: nothing was sent that a close_notify would end.
            self._waiting = []
            self.transport.loseConnection()

    def _close_tls(self) -> None:
        if self._tls is not None and self._error is None:
            with contextlib.suppress(ssl.SSLError, OSError):
                self._tls.unwrap()  # our close_notify
            self._flush()
        if self.transport is not None:
            self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.disconnecting = True
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def getPeer(self) -> Any:
        return self.transport.getPeer() if self.transport is not None else None

    def getHost(self) -> Any:
        return self.transport.getHost() if self.transport is not None else None

    def pauseProducing(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self.abortConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.transport is not None:
            self.transport.registerProducer(producer, streaming)  # type: ignore[attr-defined]

    def unregisterProducer(self) -> None:
        if self.transport is not None:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]


class _TLSFactory(Factory):
    noisy = False

    def __init__(self, context: ssl.SSLContext, hostname: str, wrapped: IProtocolFactory) -> None:
        self._context = context
        self._hostname = hostname
        self._wrapped = wrapped

    def buildProtocol(self, addr: Any) -> TLSClient | None:
        inner = self._wrapped.buildProtocol(addr)
        if inner is None:
            return None
        return TLSClient(self._context, self._hostname, inner)


@implementer(IStreamClientEndpoint)
class TLSEndpoint:
    """Connects through ``tcp`` and speaks TLS to ``hostname`` (SNI and verification);
    the connection's Deferred fires with the wrapped protocol, as Twisted's
    ``wrapClientTLS`` does."""

    def __init__(self, context: ssl.SSLContext, hostname: str, tcp: IStreamClientEndpoint) -> None:
        self._context = context
        self._hostname = hostname
        self._tcp = tcp

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        connecting: Deferred[Any] = self._tcp.connect(
            _TLSFactory(self._context, self._hostname, factory)
        )
        return connecting.addCallback(lambda tls: tls.wrapped)
