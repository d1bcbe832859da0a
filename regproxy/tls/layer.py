"""TLS with the standard library's ``ssl`` module over a Twisted TCP connection.

Twisted's TLS layer (``twisted.protocols.tls``) goes through pyOpenSSL one 16 KiB record
per Python call each way: decrypting, it hands each record's plaintext to the protocol
above on its own, so a 256 KiB socket read of a blob travels the HTTP parser, the body
relay and the client's write sixteen times; encrypting, every 16 KiB slice is one
``SSL_write``, one ``bio_read`` and one TCP write, each behind cffi wrappers and error
checks. This layer uses ``ssl.SSLObject`` with memory BIOs (C, no cffi): every record
of one socket read is decrypted and the plaintext goes up once, joined, and a write of
any size is encrypted in one call and goes down as one TCP write. The protocol above
sees the transport interface it would see under Twisted's layer (``ITransport``,
``ISSLTransport``, producers), so twisted.web's ``HTTPChannel`` and regproxy's upstream
connection run on it unchanged.

Upstream connections (``regproxy.upstream._tls``) and ``ssl:`` listeners
(``regproxy.server.listen_tls``) use it; docs/benchmarks.rst has what it saves.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IPushProducer,
    ISSLTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

# Plaintext asked of the TLS object per call; it returns at most one record's worth.
_RECORD = 64 * 1024


@implementer(ITransport, ISSLTransport, IPushProducer, IConsumer)
class TLSLayer(Protocol):
    """TLS over a TCP connection, for the protocol it wraps: the transport that one sees.

    ``hostname`` makes it the client side (SNI, and the name the certificate must hold);
    without one it is the server side of a listener. On the client side, ``session`` is a
    session of an earlier connection to resume (the server may decline: then the
    handshake is a full one), and ``on_session`` is told of this connection's session
    once the server has sent what resuming it needs.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        wrapped: IProtocol,
        hostname: str | None = None,
        *,
        session: ssl.SSLSession | None = None,
        on_session: Callable[[ssl.SSLSession], None] | None = None,
    ) -> None:
        self._context = context
        self._hostname = hostname
        self._session = session
        self._on_session = on_session
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
                self._incoming,
                self._outgoing,
                server_side=self._hostname is None,
                server_hostname=self._hostname,
                session=self._session,
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
        if self._on_session is not None:
            self._offer_session(tls)
        self._deliver(pieces)
        if self._closed_cleanly and self.transport is not None:
            self.transport.loseConnection()

    def _offer_session(self, tls: ssl.SSLObject) -> None:
        """Hand this connection's session over once it can be resumed: at once under TLS
        1.2, after the server's ticket (which follows the handshake) under TLS 1.3."""
        session = tls.session
        if session is None or not (session.has_ticket or tls.version() == "TLSv1.2"):
            return
        offer, self._on_session = self._on_session, None
        if offer is not None:
            offer(session)

    @property
    def session_reused(self) -> bool:
        """Whether this connection resumed an earlier session (no full handshake)."""
        return self._tls is not None and self._handshaken and self._tls.session_reused

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
        if self.transport is None:
            return
        if self._hostname is None:
            # A listener: the peer (a scanner, a client speaking plain HTTP) gets the
            # alert that says why before the connection closes.
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if self._lost:
            return
        self._lost = True
        if self._error is not None:
            reason = self._error
        elif (
            self._hostname is not None
            and reason.check(ConnectionDone)
            and not self._closed_cleanly
            and not self.disconnecting
        ):
            # The client side: a server's answer may be delimited by the connection's end,
            # so an end an attacker could forge is not a clean one. (Clients of a listener
            # often just close; their requests are framed by their own lengths.)
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

    def loseWriteConnection(self) -> None:
        """A TLS connection cannot be half closed: its close_notify ends both ways."""
        self.loseConnection()

    def getTcpNoDelay(self) -> bool:
        return bool(self.transport.getTcpNoDelay())  # type: ignore[union-attr]

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)  # type: ignore[union-attr]

    def getTcpKeepAlive(self) -> bool:
        return bool(self.transport.getTcpKeepAlive())  # type: ignore[union-attr]

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.transport.setTcpKeepAlive(enabled)  # type: ignore[union-attr]

    def getPeerCertificate(self) -> Any:
        """``ISSLTransport``: no client certificates are asked for."""
        return None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.transport is not None:
            self.transport.registerProducer(producer, streaming)  # type: ignore[attr-defined]

    def unregisterProducer(self) -> None:
        if self.transport is not None:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
