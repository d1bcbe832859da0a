"""An upstream response body as an answer's :class:`~regproxy.protocol.fetch.Body`:
streamed to its consumer with backpressure, never buffered.

The relay is the consumer's streaming producer: when the client's socket buffer fills,
Twisted pauses us and we pause the upstream transport, so a slow client slows the upstream
read instead of filling memory. When the client leaves, the upstream transfer stops at once.
An idle timer catches an upstream that stalls mid-body, and a client that stops reading.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from . import reading


class BodyFailed(Exception):
    """A body that cannot be completed; ``kind`` is what the request record says."""

    kind = "body"


class UpstreamIdle(BodyFailed):
    """The upstream sent nothing for too long while the client was ready for more."""

    kind = "idle"


class ClientStalled(BodyFailed):
    """The client read nothing for too long: it holds an upstream transfer for nothing.

    Like nginx's ``send_timeout``: a client may be slow, but one that stops reading
    altogether would otherwise pin an upstream connection for ever.
    """

    kind = "client_stalled"


@implementer(IPushProducer)
class BodyRelay(Protocol):
    """Receives the upstream body (``response.deliverBody``) and writes it to ``consumer``.

    ``done`` fires with the byte count when the body is complete, or fails when the upstream
    broke off, stalled, or the consumer went away (``stop``).
    """

    def __init__(self, consumer: IConsumer, clock: IReactorTime, idle_timeout: float) -> None:
        self.consumer = consumer
        self.done: Deferred[int] = Deferred(lambda _: self.stop())
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
        self.consumer.registerProducer(self, True)
        self._registered = True
        self._timer = self._clock.callLater(self._idle_timeout, self._check_idle)

    def dataReceived(self, data: bytes) -> None:
        self._active = True
        if not self._stopped:
            self.sent += len(data)
            self.consumer.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._registered and not self._stopped:
            self.consumer.unregisterProducer()
        self._registered = False
        if self.done.called:
            return
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
        """The consumer is gone: stop writing and close the upstream body transfer."""
        self.stop()

    def stop(self, failure: Failure | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._failure = failure
        if self._registered:
            self._registered = False
            # A twisted.web request may already be detached from its channel.
            channel: Any = getattr(self.consumer, "channel", True)
            if channel is not None:
                self.consumer.unregisterProducer()
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


class UpstreamBody:
    """The body of an upstream response, delivered once (or discarded)."""

    def __init__(self, response: IResponse, clock: IReactorTime, idle_timeout: float) -> None:
        self.response = response
        self.length = None if response.length is UNKNOWN_LENGTH else int(response.length)
        self._clock = clock
        self._idle_timeout = idle_timeout

    def deliver(self, consumer: IConsumer) -> Deferred[int]:
        relay = BodyRelay(consumer, self._clock, self._idle_timeout)
        self.response.deliverBody(relay)
        return relay.done

    def discard(self) -> None:
        # Unread and unwanted: close rather than read a possibly large body off.
        self.response.deliverBody(reading.Abandon())
