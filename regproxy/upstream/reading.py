"""Reading upstream bodies the proxy does not stream: read off and dropped, abandoned, or
read whole when small (lists and errors to rewrite), bounded in size and in silence."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from ..protocol.errors import OCIError


class Discard(Protocol):
    """Reads a body nobody needs, so the pooled connection can be reused."""


class Abandon(Protocol):
    """Stops a body transfer at once: the connection is closed, not reused."""

    def connectionMade(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


class _Collector(Protocol):
    def __init__(
        self, limit: int, done: Deferred[bytes], clock: IReactorTime, idle_timeout: float
    ) -> None:
        self.limit = limit
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0
        self.stalled = False
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._idle_timeout, self._stall)

    def _stall(self) -> None:
        self._timer = None
        self.stalled = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.reset(self._idle_timeout)
        self.size += len(data)
        if self.size > self.limit:
            self.parts = []
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.stalled:
            self.done.errback(OCIError("UPSTREAM_TIMEOUT", "the upstream response stalled"))
        elif self.size > self.limit:
            self.done.errback(
                OCIError("UPSTREAM_UNAVAILABLE", "upstream response is too large to rewrite")
            )
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def read_bounded(
    response: IResponse, limit: int, clock: IReactorTime, idle_timeout: float
) -> Deferred[bytes]:
    """The whole (small) body, failing past ``limit`` bytes or after ``idle_timeout`` of
    silence: an upstream that stalls must not hold a request forever."""

    def cancel(_: Deferred[bytes]) -> None:
        # The client left: stop the transfer rather than read on for nobody.
        if collector.transport is not None:
            collector.transport.stopProducing()  # type: ignore[attr-defined]

    done: Deferred[bytes] = Deferred(cancel)
    collector = _Collector(limit, done, clock, idle_timeout)
    response.deliverBody(collector)
    return done
