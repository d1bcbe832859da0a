"""One upstream HTTP/1.1 connection: requests out, responses parsed by llhttp (httptools).

Twisted's ``HTTP11ClientProtocol`` parses a response a line at a time in Python (a
``LineReceiver`` call, a state dispatch and a ``Headers`` update per header line), pauses
and resumes the socket around every response even when the whole body came with the
headers (two ``epoll_ctl`` calls each time), and fires a chain of Deferreds per exchange.
For a proxy whose answers are mostly small manifests, that machinery is most of the CPU a
request costs. Here the response is parsed by llhttp (Node's parser, through httptools)
in one C call per read, and what the parse found is acted on once that call returned:

- the response Deferred fires after the parser is done with the read, so nothing the
  application does (pause, stop, a new request on a connection that just became idle)
  runs inside the parser;
- the body is delivered once ``deliverBody`` is called; bytes that came before are held
  (at most one read) and the socket is paused only if the body is not complete yet;
- one request at a time; the connection is idle again only after the whole response was
  read and both sides agreed to keep it (``Connection: close``, HTTP/1.0 and requests
  with a body are not reused);
- strict framing: llhttp refuses conflicting lengths, Content-Length together with
  Transfer-Encoding, bad chunk sizes and malformed lines; a transfer coding other than
  ``chunked`` alone is refused here; a header block over ``MAX_HEAD_BYTES`` closes the
  connection. A response to HEAD ends at its headers whatever its Content-Length says
  (llhttp cannot be told the request was a HEAD, so the parse is stopped there), and
  1xx interim answers are skipped.

Failures are Twisted's own public exception types, as ``twisted.web.client`` reports
them: ``ResponseNeverReceived`` when no byte of an answer came (the pool may retry those),
``ResponseFailed`` after that, and a body cut short ends with ``ResponseFailed``; a body
delimited by the connection's end ends with ``PotentialDataLoss``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attr
from httptools import HttpParserCallbackError, HttpParserError, HttpResponseParser
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IClientRequest, IResponse
from zope.interface import implementer

# A response's status line and headers together may not exceed this (Twisted's client
# allows 64 KiB per line; nginx's proxy_buffer_size is 4-8 KiB by default).
MAX_HEAD_BYTES = 64 * 1024

# Read from an upstream socket at a time. Twisted reads 64 KiB (FileDescriptor's
# bufferSize); every read then travels the relay path in Python (parser, body protocol,
# client write), so a blob costs that per-read overhead 16384 times per GiB. Reading more
# at once when more is there divides it; the client side still pauses the upstream past
# its own write buffer, so a stream holds at most about one read more.
READ_SIZE = 256 * 1024

# Connection-level headers: they describe this hop, not the response, so they are not in
# ``response.headers`` (as with Twisted's client). Content-Length becomes ``length``.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"content-length",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)


class RequestNotSent(Exception):
    """The connection was not idle (or no longer open) when a request was given to it."""


class ResponseFraming(Exception):
    """The upstream's answer cannot be framed safely (malformed, ambiguous, too large)."""


class _StopAtHeaders(Exception):
    """Raised from the parser's headers callback to end the parse of a bodiless answer."""


class _AfterTheAnswer(Exception):
    """Raised from the parser when bytes follow a complete answer (nobody asked for more)."""


def read_larger(transport: Any, size: int = READ_SIZE) -> None:
    """Raise the read size of the socket under ``transport`` (TLS wraps it: its
    ``transport`` is the TCP one). ``bufferSize`` is the public attribute Twisted's
    ``FileDescriptor`` reads with; a transport without one (a test's) is left alone."""
    while transport is not None:
        if isinstance(getattr(transport, "bufferSize", None), int) and hasattr(
            transport, "doRead"
        ):
            transport.bufferSize = max(transport.bufferSize, size)
            return
        transport = getattr(transport, "transport", None)


@implementer(IClientRequest)
@attr.s(auto_attribs=True, slots=True)
class OutgoingRequest:
    """A request as the connection writes it: ``target`` is the origin form (path?query)."""

    method: bytes
    target: bytes
    headers: Headers
    bodyProducer: IBodyProducer | None = None
    absoluteURI: bytes = b""

    def head(self, extra: bytes = b"") -> bytes:
        lines = [b"%b %b HTTP/1.1\r\n" % (self.method, self.target)]
        for name, values in self.headers.getAllRawHeaders():
            for value in values:
                lines.append(b"%b: %b\r\n" % (name, value))
        lines.append(extra)
        lines.append(b"\r\n")
        return b"".join(lines)


@implementer(IResponse)
class UpstreamResponse:
    """An answer whose headers were read; the body follows through :meth:`deliverBody`."""

    previousResponse: IResponse | None = None

    def __init__(
        self,
        connection: ClientConnection,
        request: OutgoingRequest,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        length: int | object,
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self.request = request
        self._connection = connection

    def deliverBody(self, protocol: Any) -> None:
        self._connection.deliver_body_to(protocol)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response


@implementer(IPushProducer)
class _BodyTransport:
    """What the body protocol holds as its ``transport``: flow control of one body. Once
    it ended, its reader's pause, resume or stop (a consumer's buffer filling after the
    last bytes) is ignored: the connection is idle or carries another exchange."""

    def __init__(self, connection: ClientConnection) -> None:
        self._connection = connection

    def pauseProducing(self) -> None:
        self._connection.pause_body(self)

    def resumeProducing(self) -> None:
        self._connection.resume_body(self)

    def stopProducing(self) -> None:
        self._connection.stop_body(self)


class _BodyWriter:
    """Writes a request body to the transport; the producer registers with the transport."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._transport.unregisterProducer()


@implementer(IConsumer)
class _ChunkedWriter(_BodyWriter):
    """Writes a request body of unknown length with chunked framing."""

    def write(self, data: bytes) -> None:
        if data:
            self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))


@implementer(IConsumer)
class _LengthWriter(_BodyWriter):
    """Writes a request body of announced length, refusing more bytes than announced."""

    def __init__(self, transport: Any, length: int) -> None:
        super().__init__(transport)
        self.remaining = length

    def write(self, data: bytes) -> None:
        self.remaining -= len(data)
        if self.remaining < 0:
            raise ValueError("the request body is longer than its Content-Length")
        self._transport.write(data)


# Connection states (``state``), named as Twisted's HTTP11ClientProtocol names them where
# the pool looks at them: QUIESCENT (idle), CONNECTION_LOST, ABORTED.
QUIESCENT = "QUIESCENT"
TRANSMITTING = "TRANSMITTING"
WAITING = "WAITING"
RECEIVING = "RECEIVING"
CONNECTION_LOST = "CONNECTION_LOST"
ABORTED = "ABORTED"


class ClientConnection(Protocol):
    """One upstream HTTP/1.1 connection; see the module."""

    def __init__(self, quiescent: Callable[[ClientConnection], None]) -> None:
        self.state = QUIESCENT
        self._quiescent = quiescent
        self._request: OutgoingRequest | None = None
        self._answer: Deferred[IResponse] | None = None
        self._parser: HttpResponseParser | None = None
        self._aborted: Deferred[None] | None = None
        self._gone = False  # the transport reported the connection lost
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self._received_any = False
        self._head_bytes = 0
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._headers_done = False
        self._complete = False
        self._keep_alive = False
        self._eof_body = False
        self._reusable = True
        self._response: UpstreamResponse | None = None
        self._held: list[bytes] = []
        self._body: Any = None
        self._body_transport: _BodyTransport | None = None  # None once the body ended
        self._body_paused = False
        self._socket_paused = False
        self._stopped = False
        self._status = 0
        self._phrase = b""
        self._interim = False
        # How the body ends, once known: ResponseDone, PotentialDataLoss or a failure.
        self._body_end: Failure | None = None

    # -- the protocol -------------------------------------------------------------------

    def connectionMade(self) -> None:
        read_larger(self.transport)

    def request(self, request: OutgoingRequest) -> Deferred[IResponse]:
        if self.state != QUIESCENT:
            return fail(RequestNotSent())
        self._reset_exchange()
        self._request = request
        self._parser = HttpResponseParser(self)
        answer: Deferred[IResponse] = Deferred(self._cancel)
        self._answer = answer
        producer = request.bodyProducer
        transport: Any = self.transport
        if producer is None:
            extra = b"Content-Length: 0\r\n" if request.method in (b"POST", b"PUT") else b""
            self.state = WAITING
            transport.write(request.head(extra))
            return answer
        self._reusable = False  # an early answer could leave the body half sent
        self.state = TRANSMITTING
        writer: _LengthWriter | _ChunkedWriter
        if producer.length is UNKNOWN_LENGTH:
            transport.write(request.head(b"Transfer-Encoding: chunked\r\n"))
            writer = _ChunkedWriter(transport)
        else:
            length = int(producer.length)
            transport.write(request.head(b"Content-Length: %d\r\n" % length))
            writer = _LengthWriter(transport, length)
        try:
            writing = producer.startProducing(writer)
        except Exception:
            writing = fail()
        writing.addCallbacks(self._body_sent, self._body_failed, (writer,))
        return answer

    def _body_sent(self, _: object, writer: _LengthWriter | _ChunkedWriter) -> None:
        if self.state != TRANSMITTING:
            return
        if isinstance(writer, _ChunkedWriter):
            self.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
        elif writer.remaining:
            self._body_failed(Failure(ValueError("the request body ended early")))
            return
        self.state = WAITING
        if self._complete:
            self._finish_exchange()

    def _body_failed(self, failure: Failure) -> None:
        if self.state in (TRANSMITTING, WAITING):
            self._fail_exchange(RequestTransmissionFailed([failure]), abort=True)

    def dataReceived(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._complete:
            # Bytes nobody asked for (on an idle connection, or after a complete
            # answer): the connection's framing can no longer be trusted.
            self._parser = None
            self._reusable = False
            if self.state == QUIESCENT:
                self.state = CONNECTION_LOST
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._received_any = True
        stopped_at_headers = False
        try:
            parser.feed_data(data)
        except HttpParserCallbackError as error:
            if isinstance(error.__context__, _StopAtHeaders):
                stopped_at_headers = True
            elif isinstance(error.__context__, _AfterTheAnswer):
                self._reusable = False  # the answer is whole; what follows is not ours
            else:
                # A framing refusal of ours, or anything else a callback raised: the
                # exchange fails, the connection closes, nothing escapes to the reactor.
                reason = error.__context__ if error.__context__ is not None else error
                self._fail_exchange(ResponseFailed([Failure(reason)]), abort=True)
                return
        except HttpParserError as error:
            if self._complete:
                self._reusable = False
            else:
                self._fail_exchange(
                    ResponseFailed([Failure(ResponseFraming(f"malformed answer: {error}"))]),
                    abort=True,
                )
                return
        if not self._headers_done:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail_exchange(
                    ResponseFailed(
                        [Failure(ResponseFraming("the answer's headers are too large"))]
                    ),
                    abort=True,
                )
            return
        if stopped_at_headers:
            self._complete = True
            self._body_end = Failure(ResponseDone())
            # The answer ended at its headers: anything after them in this read means the
            # upstream sent a body nobody framed, so the connection is not used again.
            if not data.endswith(b"\r\n\r\n"):
                self._reusable = False
        if self._response is None:
            self._answer_received()
        self._deliver()

    def _answer_received(self) -> None:
        request = self._request
        assert request is not None and self._parser is not None
        headers = Headers()
        length: int | object = UNKNOWN_LENGTH
        head = request.method == b"HEAD"
        bodiless = head or self._status in (204, 304)
        for name, value in self._raw_headers:
            lower = name.lower()
            if lower in _HOP_BY_HOP:
                if lower == b"content-length":
                    if not bodiless:
                        length = int(value)
                    if not head:
                        continue
                else:
                    continue
            headers.addRawHeader(name, value)
        if bodiless:
            length = 0
        if self._eof_body:
            self._reusable = False
        version = self._parser.get_http_version().encode("ascii").split(b".")
        response = UpstreamResponse(
            self,
            request,
            (b"HTTP", int(version[0]), int(version[1])),
            self._status,
            self._phrase,
            headers,
            length,
        )
        self._response = response
        if self.state == WAITING:
            self.state = RECEIVING
        answer, self._answer = self._answer, None
        if answer is not None:
            answer.callback(response)

    # -- httptools callbacks (inside feed_data: they only record) ---------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise _AfterTheAnswer()
        self._raw_headers = []

    def on_status(self, phrase: bytes) -> None:
        self._phrase = phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None and self._request is not None
        status = parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise ResponseFraming("the upstream switched protocols unasked")
            self._interim = True  # an interim answer: the real one follows
            return
        self._interim = False
        self._status = status
        self._headers_done = True
        self._keep_alive = parser.should_keep_alive()
        codings = [
            value for name, value in self._raw_headers if name.lower() == b"transfer-encoding"
        ]
        has_length = any(name.lower() == b"content-length" for name, _ in self._raw_headers)
        if codings and b",".join(codings).strip().lower() != b"chunked":
            raise ResponseFraming("a transfer coding other than chunked")
        if self._request.method == b"HEAD":
            raise _StopAtHeaders()
        if not codings and not has_length and status not in (204, 304):
            self._eof_body = True  # delimited by the connection's end

    def on_body(self, body: bytes) -> None:
        self._held.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._raw_headers = []
            return
        self._complete = True
        self._body_end = Failure(ResponseDone())

    # -- the body -------------------------------------------------------------------

    def deliver_body_to(self, protocol: Any) -> None:
        if self._body is not None or self._stopped:
            raise RuntimeError("the body of this answer is already being delivered")
        self._body = protocol
        self._body_transport = _BodyTransport(self)
        protocol.makeConnection(self._body_transport)
        self._deliver()

    def _deliver(self) -> None:
        """Hand held bytes to the body protocol while it wants them, then its end."""
        body = self._body
        if body is None:
            if self._held and self._body_end is None:
                self._pause_socket()  # nobody reads yet: hold at most this read
            return
        held = self._held
        while held and not self._body_paused and not self._stopped:
            body.dataReceived(held.pop(0))
        if held or self._stopped:
            return
        end = self._body_end
        if end is not None:
            self._body, self._body_transport = None, None
            self._stopped = True
            if self._complete and self.state == RECEIVING:
                self._finish_exchange()
            body.connectionLost(end)
        elif not self._body_paused:
            self._resume_socket()

    def pause_body(self, of: _BodyTransport) -> None:
        if of is self._body_transport:
            self._body_paused = True
            self._pause_socket()

    def resume_body(self, of: _BodyTransport) -> None:
        if of is self._body_transport:
            self._body_paused = False
            self._deliver()
            if not self._body_paused and not self._complete:
                self._resume_socket()

    def stop_body(self, of: _BodyTransport) -> None:
        """The reader wants no more: the connection is closed, the body ends failed."""
        if self._stopped or self._body is None or of is not self._body_transport:
            return
        self._stopped = True
        body, self._body, self._body_transport = self._body, None, None
        self._held = []
        self.state = ABORTED
        self._abort()
        body.connectionLost(Failure(ResponseFailed([Failure(ConnectionAborted())])))

    def _pause_socket(self) -> None:
        if not self._socket_paused and self.transport is not None:
            self._socket_paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def _resume_socket(self) -> None:
        if self._socket_paused and self.transport is not None:
            self._socket_paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # -- the end of an exchange -------------------------------------------------------

    def _finish_exchange(self) -> None:
        self._parser = None
        self._request = None
        self._resume_socket()
        if self._reusable and self._keep_alive:
            self.state = QUIESCENT
            self._quiescent(self)
        else:
            self.state = CONNECTION_LOST
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _fail_exchange(self, error: Exception, *, abort: bool) -> None:
        self._parser = None
        if abort:
            self.state = ABORTED
            self._abort()
        else:
            self.state = CONNECTION_LOST
        answer, self._answer = self._answer, None
        if answer is not None:
            answer.errback(Failure(error))
        elif self._body_end is None:
            self._body_end = Failure(error)
            self._deliver()

    def _abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def _cancel(self, answer: Deferred[IResponse]) -> None:
        """The caller gave up before the answer's headers: close the connection."""
        if self._answer is not answer:
            return
        self._answer = None
        self._parser = None
        self.state = ABORTED
        self._abort()
        answer.errback(Failure(ResponseNeverReceived([Failure(CancelledError())])))

    def abort(self) -> Deferred[None]:
        """Close the connection now; fires once it is closed (at once if it already is)."""
        if self._gone:
            return succeed(None)
        self.state = ABORTED
        if self._aborted is None:
            self._aborted = Deferred()
        self._abort()
        return self._aborted

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._gone = True
        previous = self.state
        self.state = CONNECTION_LOST if previous != ABORTED else ABORTED
        self._parser = None
        answer, self._answer = self._answer, None
        if answer is not None:
            if self._received_any:
                answer.errback(Failure(ResponseFailed([reason])))
            elif previous == TRANSMITTING:
                answer.errback(Failure(RequestTransmissionFailed([reason])))
            else:
                answer.errback(Failure(ResponseNeverReceived([reason])))
        if self._response is not None and self._body_end is None:
            if self._eof_body and reason.check(ConnectionDone):
                self._body_end = Failure(PotentialDataLoss())
            else:
                self._body_end = Failure(ResponseFailed([reason]))
            self._body_paused = False  # nothing more will come: hand over what is held
            self._deliver()
        aborted, self._aborted = self._aborted, None
        if aborted is not None:
            aborted.callback(None)
