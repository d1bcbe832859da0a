"""Serving a committed object to a twisted.web request: flat memory, backpressure, Range.

On a plain TCP connection the bytes go from the page cache to the socket with ``os.sendfile``
(no copy through Python). The socket is shared with Twisted's transport, so the one rule is
never to let our bytes overtake bytes still in the transport's own buffer (the headers, or an
earlier response). ``twisted.web.http.HTTPChannel.registerProducer`` documents the signal we
use: a streaming producer is resumed "only when [the write buffer] empties". So the producer
writes a chunk a little larger than the transport's buffer through ``request.write`` (which
pauses it), and on ``resumeProducing`` -- buffer drained -- sends with ``sendfile`` until the
socket is full, then writes the next chunk the ordinary way to be told when it drains again.
``transport_buffer_is_empty`` double-checks the buffer before every ``sendfile``; it is the
one place that reads Twisted internals, and a test fails if they change.

TLS (and anything that is not a plain ``tcp.Server``) falls back to a producer reading chunks
with ``os.pread``, paused and resumed by the transport.

No complete wrong body from disk: an object this process has not hashed whole since it
adopted it (``StoredObject.verified`` False: committed by another process, or found at
start-up) goes through ``VerifyingProducer``, which hashes from byte 0 what it sends and holds
the last chunk of the answer back until the whole object hashed to its digest. Bytes outside
a requested range are hashed too, in slices across reactor turns. On a mismatch the client is
cut off before its last bytes and the object removed; on a match it is marked verified and
the next answer may use sendfile again.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import attrs
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from ..protocol.errors import error_body
from .metrics import CacheMetrics, NullMetrics
from .objects import sha256_hex
from .store import StoredObject

CHUNK = 64 * 1024
SENDFILE_SLICE = 4 * 1024 * 1024
"""At most this much per ``sendfile`` turn before yielding to the reactor (fairness)."""
HASH_SLICE = 4 * 1024 * 1024
"""At most this much hashed without sending (outside a range) per reactor turn."""


class CorruptObject(Exception):
    """The stored object does not hash to its digest: the client was cut off."""


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")

log = Logger()


@attrs.frozen
class ByteRange:
    """Bytes ``first``..``last`` inclusive, as HTTP counts them."""

    first: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1


@attrs.frozen
class Unsatisfiable:
    """A range that starts past the end: 416."""


def parse_range(header: bytes | None, size: int) -> ByteRange | Unsatisfiable | None:
    """The single byte range asked for, or None to send the whole object.

    RFC 9110 14.2: a server may ignore a Range it does not support, so several ranges and
    malformed values get the whole object (200) rather than an error.
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.decode("latin-1").strip().replace(" ", ""))
    if match is None:
        return None
    start, end = match.groups()
    if start == "":
        if end == "":
            return None
        suffix = int(end)
        if suffix == 0:
            return Unsatisfiable()
        return ByteRange(max(0, size - suffix), size - 1) if size else Unsatisfiable()
    first = int(start)
    if end != "" and int(end) < first:
        return None
    if first >= size:
        return Unsatisfiable()
    last = size - 1 if end == "" else int(end)
    return ByteRange(first, min(last, size - 1))


def choose_range(
    request: Request, size: int, etag: bytes | None = None
) -> ByteRange | Unsatisfiable | None:
    """``parse_range`` of the request's ``Range``, honouring ``If-Range`` against ``etag``
    (content by digest never changes, but an ``If-Range`` naming something else means the
    client's partial copy is of something else: it gets the whole object)."""
    if_range = request.getHeader(b"if-range")
    if if_range is not None and (etag is None or if_range.strip() != etag):
        return None
    return parse_range(request.getHeader(b"range"), size)


def serve_object(
    request: Request,
    obj: StoredObject,
    *,
    byte_range: ByteRange | Unsatisfiable | None = None,
    metrics: CacheMetrics | None = None,
    use_sendfile: bool = True,
    chunk_size: int = CHUNK,
    clock: IReactorTime | None = None,
) -> Deferred[int]:
    """Answer ``request`` with ``obj`` (200, 206 or 416) and finish it; closes ``obj``.

    The caller has set the other headers (Content-Type, Docker-Content-Digest, ETag). Fires
    with the body bytes sent; fails if the client went away or the object turned out corrupt
    (``CorruptObject``: it is removed from the store); the connection is then dropped, never
    finished, so a client can never take a cut body for a whole one. HEAD gets the headers
    only. ``clock`` schedules the hashing of bytes outside a range of an object not verified
    yet (default: the reactor of the request's site).
    """
    counts: CacheMetrics = metrics if metrics is not None else NullMetrics()
    request.setHeader(b"accept-ranges", b"bytes")
    if isinstance(byte_range, Unsatisfiable):
        obj.close()
        request.setResponseCode(416)
        request.setHeader(b"content-range", b"bytes */%d" % obj.size)
        request.setHeader(b"content-type", b"application/json")
        body = error_body("RANGE_INVALID", "the range is not satisfiable", {"size": obj.size})
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()
        return Deferred.fromCoroutine(_zero())
    if byte_range is None:
        first, end = 0, obj.size
    else:
        first, end = byte_range.first, byte_range.last + 1
        request.setResponseCode(206)
        request.setHeader(
            b"content-range", b"bytes %d-%d/%d" % (byte_range.first, byte_range.last, obj.size)
        )
    request.setHeader(b"content-length", b"%d" % (end - first))
    if request.method == b"HEAD" or first == end:
        obj.close()
        request.finish()
        return Deferred.fromCoroutine(_zero())
    if obj.data is not None:
        request.write(obj.data[first:end])
        obj.close()
        request.finish()
        counts.count("bytes_from_cache", end - first)
        return Deferred.fromCoroutine(_value(end - first))
    producer = object_producer(
        request,
        obj,
        first,
        end,
        metrics=counts,
        clock=clock,
        use_sendfile=use_sendfile,
        chunk_size=chunk_size,
    )
    request.notifyFinish().addErrback(lambda _: producer.stopProducing())

    def finished(sent: int) -> int:
        counts.count("bytes_from_cache", sent)
        request.finish()
        return sent

    def failed(failure: Failure) -> Failure:
        counts.count("bytes_from_cache", producer.sent)
        _abort(request)
        return failure

    producer.done.addCallbacks(finished, failed)
    producer.start()
    return producer.done


def object_producer(
    request: Request,
    obj: StoredObject,
    first: int,
    end: int,
    *,
    metrics: CacheMetrics,
    clock: IReactorTime | None = None,
    use_sendfile: bool = True,
    chunk_size: int = CHUNK,
) -> ObjectProducer:
    """The producer that sends bytes ``[first, end)`` of ``obj`` to ``request``: hashing
    them when this process has not verified the object yet, with ``sendfile`` on plain TCP
    once it has, else ``pread`` in chunks. ``start`` it; ``done`` says how it ended."""
    if not obj.verified:
        if clock is None:
            clock = getattr(getattr(request, "site", None), "reactor", None)
        return VerifyingProducer(request, obj, first, end, chunk_size, clock)
    transport = sendfile_transport(request) if use_sendfile else None
    if transport is not None:
        return SendfileProducer(request, obj, first, end, transport, chunk_size, metrics)
    return ObjectProducer(request, obj, first, end, chunk_size)


async def _zero() -> int:
    return 0


async def _value(value: int) -> int:
    return value


def _abort(request: Request) -> None:
    transport: Any = getattr(getattr(request, "channel", None), "transport", None)
    if transport is not None and not request.finished:
        transport.abortConnection()


@implementer(IPushProducer)
class ObjectProducer:
    """Reads ``[first, end)`` of the object in chunks, one chunk per turn while not paused."""

    def __init__(
        self, request: Request, obj: StoredObject, first: int, end: int, chunk_size: int
    ) -> None:
        self.request = request
        self.obj = obj
        self.position = first
        self.end = end
        self.sent = 0
        self.done: Deferred[int] = Deferred()
        self._chunk_size = chunk_size
        self._paused = False
        self._producing = False
        self._over = False

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._run()

    def _run(self) -> None:
        if self._producing or self._over:
            return
        self._producing = True
        try:
            self._produce()
        except OSError as error:
            self._end(Failure(error))
        finally:
            self._producing = False

    def _produce(self) -> None:
        while not self._paused and not self._over and self.position < self.end:
            self._write_chunk()
        if self.position >= self.end:
            self._end(None)

    def _write_chunk(self) -> None:
        length = min(self._chunk_size, self.end - self.position)
        data = self.obj.read(self.position, length)
        if not data:
            raise OSError("the cached file is shorter than its size")
        self.position += len(data)
        self.sent += len(data)
        self.request.write(data)

    def stopProducing(self) -> None:
        self._end(Failure(ConnectionLost("the client went away")))

    def _end(self, failure: Failure | None) -> None:
        if self._over:
            return
        self._over = True
        self.obj.close()
        if getattr(self.request, "channel", None) is not None:
            self.request.unregisterProducer()
        if failure is None:
            self.done.callback(self.sent)
        else:
            self.done.errback(failure)


class VerifyingProducer(ObjectProducer):
    """Sends ``[first, end)`` of an object not hashed yet, hashing the whole object from 0.

    The range's last chunk is held back until every byte of the object has been hashed:
    sent on a match (the object is then ``confirm``-ed), never sent on a mismatch (the object
    is ``condemn``-ed and ``done`` fails with ``CorruptObject``, so the caller cuts the
    connection). Bytes before and after the range are only hashed, ``HASH_SLICE`` per reactor
    turn (``clock``; None: all at once).
    """

    def __init__(
        self,
        request: Request,
        obj: StoredObject,
        first: int,
        end: int,
        chunk_size: int,
        clock: IReactorTime | None,
    ) -> None:
        super().__init__(request, obj, first, end, chunk_size)
        self._clock = clock
        self._hasher = hashlib.sha256()
        self._hashed = 0
        self._held = b""
        self._later: IDelayedCall | None = None

    def _produce(self) -> None:
        budget = HASH_SLICE
        size = self.obj.size
        while not self._over:
            if self._hashed < self.position or (self.position >= self.end and self._hashed < size):
                # Outside the range: hash only, a slice per turn.
                if budget <= 0 and self._clock is not None:
                    self._continue_later()
                    return
                stop = self.position if self._hashed < self.position else size
                budget -= self._hash_only(min(HASH_SLICE, stop - self._hashed))
            elif self.position < self.end:
                if self._paused:
                    return
                self._send_chunk()
            else:
                self._verdict()
                return

    def _hash_only(self, length: int) -> int:
        data = self.obj.read(self._hashed, length)
        if not data:
            raise OSError("the cached file is shorter than its size")
        self._hasher.update(data)
        self._hashed += len(data)
        return len(data)

    def _send_chunk(self) -> None:
        data = self.obj.read(self.position, min(self._chunk_size, self.end - self.position))
        if not data:
            raise OSError("the cached file is shorter than its size")
        self._hasher.update(data)
        self._hashed += len(data)
        self.position += len(data)
        if self.position >= self.end:
            self._held = data  # the answer's last bytes wait for the verdict
            return
        self.sent += len(data)
        self.request.write(data)

    def _verdict(self) -> None:
        if self._hasher.hexdigest() != sha256_hex(self.obj.digest):
            log.warn(
                "cached {digest} does not match its digest; client cut off, object removed",
                digest=self.obj.digest,
            )
            self.obj.condemn()
            self._end(Failure(CorruptObject(self.obj.digest)))
            return
        self.obj.confirm()
        held, self._held = self._held, b""
        self.sent += len(held)
        self.request.write(held)
        self._end(None)

    def _continue_later(self) -> None:
        assert self._clock is not None
        if self._later is None:
            self._later = self._clock.callLater(0, self._continued)

    def _continued(self) -> None:
        self._later = None
        self._run()

    def _end(self, failure: Failure | None) -> None:
        if self._later is not None and self._later.active():
            self._later.cancel()
        self._later = None
        super()._end(failure)


class SendfileProducer(ObjectProducer):
    """``ObjectProducer`` that sends with ``os.sendfile`` whenever the transport is drained."""

    def __init__(
        self,
        request: Request,
        obj: StoredObject,
        first: int,
        end: int,
        transport: Any,
        chunk_size: int,
        metrics: CacheMetrics,
    ) -> None:
        super().__init__(request, obj, first, end, chunk_size)
        self.transport = transport
        self.metrics = metrics
        self.sendfile_bytes = 0
        # One write larger than the transport's buffer gets us paused, then resumed when the
        # buffer is empty again: the moment sendfile may go.
        buffer_size = getattr(transport, "bufferSize", 65536)
        self._chunk_size = max(chunk_size, buffer_size + 1)

    def start(self) -> None:
        self.request.registerProducer(self, True)
        # The headers go out with the first chunk; we are resumed once both have left.
        self._producing = True
        try:
            self._write_chunk()
        except OSError as error:
            self._end(Failure(error))
            return
        finally:
            self._producing = False
        if self.position >= self.end:
            self._end(None)

    def _produce(self) -> None:
        if self._paused or self._over:
            return
        if self.position < self.end and transport_buffer_is_empty(self.transport):
            self._sendfile()
        if self._over:
            return
        if self.position >= self.end:
            self._end(None)
        else:
            # Socket full (or our slice used up): this write queues in the transport and
            # pauses us until it has drained.
            self._write_chunk()
            if self.position >= self.end:
                self._end(None)

    def _sendfile(self) -> None:
        budget = SENDFILE_SLICE
        socket_fd = self.transport.fileno()
        while self.position < self.end and budget > 0:
            try:
                sent = os.sendfile(
                    socket_fd, self.obj.fd, self.position, min(budget, self.end - self.position)
                )
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            if sent == 0:
                raise OSError("the cached file is shorter than its size")
            self.position += sent
            self.sent += sent
            self.sendfile_bytes += sent
            self.metrics.count("bytes_zero_copy", sent)
            budget -= sent
            # Keep the access log's byte count right: these bytes bypassed request.write.
            self.request.sentLength += sent


def sendfile_transport(request: Request) -> Any | None:
    """The plain TCP transport under ``request`` if sendfile may write to its socket.

    Public checks only: a ``twisted.internet.tcp.Server`` (HTTP/1.x straight on a socket; TLS
    wraps it in another protocol, HTTP/2 in a stream), not secure, and a response body sent
    as is (a Content-Length, no chunked framing to add).
    """
    channel = getattr(request, "channel", None)
    transport = getattr(channel, "transport", None)
    if not isinstance(transport, tcp.Server):
        return None
    if request.isSecure() or ISSLTransport.providedBy(transport):
        return None
    return transport


def transport_buffer_is_empty(transport: Any) -> bool:
    """Whether Twisted's user-space write buffer of a ``tcp.Server`` is empty.

    PRIVATE TWISTED API (``twisted.internet.abstract.FileDescriptor``: ``dataBuffer``,
    ``offset``, ``_tempDataLen``), isolated here on purpose: it is the safety check that our
    sendfile bytes never overtake bytes Twisted has yet to send. If Twisted renames these
    attributes this returns False, sendfile is never used (the producer still works), and
    ``test_sendfile_is_used_on_plain_tcp`` (tests/integration/test_cache_serve_sockets.py)
    fails to say so.
    """
    try:
        pending = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except (AttributeError, TypeError):
        return False
    return bool(pending == 0)
