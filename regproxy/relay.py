"""Streams an upstream response body to a client with backpressure, never buffering it.

The relay is the request's streaming producer: when the client's socket buffer fills,
Twisted pauses us and we pause the upstream transport, so a slow client slows the
upstream read instead of filling memory. When the client leaves, we stop the upstream
transfer at once. An idle timer catches an upstream that stalls mid-body.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from .protocol.errors import OCIError
from .web.observe import Exchange


class UpstreamIdle(Exception):
    """The upstream sent nothing for too long while the client was ready for more."""


class ClientStalled(Exception):
    """The client read nothing for too long: it holds an upstream transfer for nothing.

    Like nginx's ``send_timeout``: a client may be slow, but one that stops reading
    altogether would otherwise pin an upstream connection for ever.
    """


@implementer(IPushProducer)
class BodyRelay(Protocol):
    """Receives the upstream body (``response.deliverBody``) and writes it to the request.

    ``done`` fires with the byte count when the body is complete, or fails when the upstream
    broke off, stalled, or the client went away (``stop``).
    """

    def __init__(self, request: Request, clock: IReactorTime, idle_timeout: float) -> None:
        self.request = request
        self.done: Deferred[int] = Deferred()
        self.sent = 0
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._timer: IDelayedCall | None = None
        self._active = False
        self._paused = False
        self._paused_at = 0.0
        self._stopped = False
        self._registered = False
        self._failure: Failure | None = None

    # Protocol: the upstream side.

    def connectionMade(self) -> None:
        self.request.registerProducer(self, True)
        self._registered = True
        self._timer = self._clock.callLater(self._idle_timeout, self._check_idle)

    def dataReceived(self, data: bytes) -> None:
        self._active = True
        if not self._stopped:
            self.sent += len(data)
            self.request.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._registered and not self._stopped:
            self.request.unregisterProducer()
        self._registered = False
        if self._failure is not None:
            self.done.errback(self._failure)
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.sent)
        else:
            self.done.errback(reason)

    # IPushProducer: the client side.

    def pauseProducing(self) -> None:
        self._paused = True
        self._paused_at = self._clock.seconds()
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self._paused = False
        if self.transport is not None and not self._stopped:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        """The client is gone: stop writing and close the upstream body transfer."""
        self.stop()

    def stop(self, failure: Failure | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._failure = failure
        if self._registered:
            self._registered = False
            # The request may already be detached from its channel.
            channel: Any = getattr(self.request, "channel", None)
            if channel is not None:
                self.request.unregisterProducer()
        if self.transport is not None:
            # stopProducing on the body transport, never abortConnection: that is what
            # closes the upstream connection cleanly (element-hq/synapse#18368).
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _check_idle(self) -> None:
        stalled_client = (
            self._paused and self._clock.seconds() - self._paused_at >= self._idle_timeout
        )
        if self._active or (self._paused and not stalled_client):
            self._active = False
            self._timer = self._clock.callLater(self._idle_timeout, self._check_idle)
            return
        self._timer = None
        if stalled_client:
            self.stop(Failure(ClientStalled(f"client read nothing for {self._idle_timeout} s")))
        else:
            self.stop(Failure(UpstreamIdle(f"no body data for {self._idle_timeout} seconds")))


async def relay_body(
    request: Request, response: Any, clock: IReactorTime, idle_timeout: float
) -> int:
    """Stream ``response``'s body to ``request`` and finish it; returns the bytes relayed.

    On a broken upstream body the client connection is closed rather than finished, so a
    client can never take a truncated body for a whole one. Cancelling (the client left)
    stops the upstream transfer.
    """
    relay = BodyRelay(request, clock, idle_timeout)
    response.deliverBody(relay)
    try:
        sent = await relay.done
    except BaseException:
        relay.stop()
        abort_client(request)
        raise
    request.finish()
    return sent


def abort_client(request: Request) -> None:
    """Drop a client whose answer cannot be completed.

    Aborted, not closed: a closing transport would wait to flush a buffer that a stalled
    client never drains, and the request would count as in flight for as long.
    """
    transport: Any = getattr(getattr(request, "channel", None), "transport", None)
    if not request.finished and transport is not None:
        transport.abortConnection()


log = Logger()


async def relay_response(
    request: Request,
    response: IResponse,
    *,
    clock: IReactorTime,
    idle_timeout: float,
    exchange: Exchange,
) -> None:
    """Stream an upstream answer's body to the client, keeping its Content-Length.

    A transfer abandoned after the headers went out is an OCIError to the caller (whose
    error path can only close the connection by then), with its kind on ``exchange``.
    """
    if response.length is not UNKNOWN_LENGTH:
        # twisted's client takes Content-Length out of the headers into .length.
        request.setHeader(b"content-length", b"%d" % response.length)
    try:
        await relay_body(request, response, clock, idle_timeout)
    except CancelledError:
        raise
    except Exception as failure:
        if isinstance(failure, ClientStalled):
            kind = "client_stalled"
        elif isinstance(failure, UpstreamIdle):
            kind = "idle"
        else:
            kind = "body"
        exchange.error_kind = kind
        log.warn("transfer abandoned after the headers: {reason}", reason=kind)
        raise OCIError("UPSTREAM_UNAVAILABLE", "the transfer was abandoned") from None
