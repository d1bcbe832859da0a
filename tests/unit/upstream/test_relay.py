"""The upstream body relay: backpressure both ways, a clean stop, an idle timer, and its
outcome; and how the web layer's answer writer finishes or drops the client for it."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from regproxy.protocol.errors import OCIError
from regproxy.protocol.fetch import Answer
from regproxy.upstream.body import BodyRelay, ClientStalled, UpstreamBody, UpstreamIdle
from regproxy.web.answer import write_answer

IDLE = 10.0


class BodyTransport(StringTransport):
    """The upstream response body's transport, counting what the relay asks of it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")

    def abortConnection(self) -> None:
        raise AssertionError("a body transport must never be aborted")


class FakeClientTransport:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def abortConnection(self) -> None:
        self.events.append("abort")


class FakeChannel:
    def __init__(self, events: list[str]) -> None:
        self.transport = FakeClientTransport(events)


class FakeRequest:
    """Records what the relay does to the client's request."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.streaming: bool | None = None
        self.events: list[str] = []
        self.channel: Any = FakeChannel(self.events)
        self.finished = False
        self.method = b"GET"
        self.code = 200
        self.responseHeaders = Headers()

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert self.producer is None, "producer registered twice"
        self.producer, self.streaming = producer, streaming
        self.events.append("register")

    def unregisterProducer(self) -> None:
        assert self.producer is not None, "no producer to unregister"
        self.producer = None
        self.events.append("unregister")

    def write(self, data: bytes) -> None:
        assert not self.finished
        self.written.append(data)

    def finish(self) -> None:
        assert self.producer is None, "finish with a producer still registered"
        self.finished = True
        self.events.append("finish")

    def loseConnection(self) -> None:
        self.events.append("loseConnection")


class FakeResponse:
    def __init__(self) -> None:
        self.transport = BodyTransport()
        self.protocol: BodyRelay | None = None
        self.length = 5

    def deliverBody(self, protocol: BodyRelay) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)


class BodyRelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.request = FakeRequest()
        self.transport = BodyTransport()
        self.relay = BodyRelay(self.request, self.clock, IDLE)  # type: ignore[arg-type]
        self.relay.makeConnection(self.transport)

    def test_registers_as_streaming_producer(self) -> None:
        self.assertTrue(IPushProducer.providedBy(self.relay))
        self.assertIs(self.request.producer, self.relay)
        self.assertTrue(self.request.streaming)

    def test_writes_and_counts(self) -> None:
        self.relay.dataReceived(b"abc")
        self.relay.dataReceived(b"defg")
        self.relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.request.written, [b"abc", b"defg"])
        self.assertEqual(self.successResultOf(self.relay.done), 7)
        self.assertEqual(self.request.events, ["register", "unregister"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_potential_data_loss_is_done(self) -> None:
        self.relay.dataReceived(b"abc")
        self.relay.connectionLost(Failure(PotentialDataLoss()))
        self.assertEqual(self.successResultOf(self.relay.done), 3)

    def test_broken_body_fails(self) -> None:
        self.relay.dataReceived(b"abc")
        self.relay.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.failureResultOf(self.relay.done, ResponseFailed)
        self.assertEqual(self.request.events, ["register", "unregister"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pause_and_resume_reach_the_upstream(self) -> None:
        self.relay.pauseProducing()
        self.relay.resumeProducing()
        self.relay.pauseProducing()
        self.assertEqual(self.transport.calls, ["pause", "resume", "pause"])

    def test_stop_stops_the_upstream_transfer(self) -> None:
        self.relay.stop()
        self.relay.stop()
        self.assertEqual(self.transport.calls, ["stop"])
        self.assertEqual(self.request.events, ["register", "unregister"])
        # Nothing more reaches the client, and resuming no longer reaches the upstream.
        self.relay.dataReceived(b"late")
        self.relay.resumeProducing()
        self.assertEqual(self.request.written, [])
        self.assertEqual(self.transport.calls, ["stop"])
        self.relay.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.failureResultOf(self.relay.done)
        self.assertEqual(self.request.events, ["register", "unregister"])

    def test_client_gone(self) -> None:
        self.request.channel = None  # twisted detaches the request first
        self.relay.stopProducing()
        self.assertEqual(self.transport.calls, ["stop"])
        self.assertEqual(self.request.events, ["register"])

    def test_stop_with_reason_fails_done_even_if_body_completes(self) -> None:
        self.relay.stop(Failure(UpstreamIdle("x")))
        self.relay.connectionLost(Failure(ResponseDone()))
        self.failureResultOf(self.relay.done, UpstreamIdle)

    def test_idle_timeout_without_data(self) -> None:
        self.clock.advance(IDLE - 1)
        self.assertEqual(self.transport.calls, [])
        self.clock.advance(1)
        self.assertEqual(self.transport.calls, ["stop"])
        self.relay.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.failureResultOf(self.relay.done, UpstreamIdle)

    def test_no_timeout_while_data_flows(self) -> None:
        for _ in range(10):
            self.clock.advance(IDLE / 2)
            self.relay.dataReceived(b"x")
        self.assertEqual(self.transport.calls, [])
        self.assertNoResult(self.relay.done)
        # Then it stalls: at most two periods until the transfer is given up.
        self.clock.advance(IDLE)
        self.clock.advance(IDLE)
        self.assertEqual(self.transport.calls, ["stop"])

    def test_no_timeout_while_the_client_is_slow(self) -> None:
        # A slow client pauses and resumes all the time; it still reads.
        for _ in range(10):
            self.relay.pauseProducing()
            self.clock.advance(IDLE / 2)
            self.relay.resumeProducing()
            self.relay.dataReceived(b"x")
            self.clock.advance(IDLE / 2)
        self.assertNotIn("stop", self.transport.calls)
        self.assertNoResult(self.relay.done)

    def test_a_client_that_stops_reading_is_cut_off(self) -> None:
        self.relay.pauseProducing()
        self.clock.advance(IDLE)
        self.clock.advance(IDLE)
        self.assertEqual(self.transport.calls, ["pause", "stop"])
        self.relay.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.failureResultOf(self.relay.done, ClientStalled)

    def test_timer_cancelled_on_completion(self) -> None:
        self.relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(IDLE * 3)
        self.assertEqual(self.transport.calls, [])


class RelayBodyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.request = FakeRequest()
        self.response = FakeResponse()
        body = UpstreamBody(self.response, self.clock, IDLE)  # type: ignore[arg-type]
        self.done = write_answer(self.request, Answer(200, body=body))  # type: ignore[arg-type]

    def test_finishes_the_request(self) -> None:
        from twisted.internet.defer import ensureDeferred

        d = ensureDeferred(self.done)
        assert self.response.protocol is not None
        self.response.protocol.dataReceived(b"hello")
        self.assertNoResult(d)
        self.response.protocol.connectionLost(Failure(ResponseDone()))
        self.successResultOf(d)
        self.assertEqual(self.request.responseHeaders.getRawHeaders(b"content-length"), [b"5"])
        self.assertEqual(self.request.events, ["register", "unregister", "finish"])
        self.assertEqual(self.request.written, [b"hello"])

    def test_broken_body_closes_instead_of_finishing(self) -> None:
        from twisted.internet.defer import ensureDeferred

        d = ensureDeferred(self.done)
        assert self.response.protocol is not None
        self.response.protocol.dataReceived(b"hel")
        self.response.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.failureResultOf(d, OCIError)
        # Aborted, not closed: a close would wait on a client that may never read again.
        self.assertEqual(self.request.events, ["register", "unregister", "abort"])
        self.assertFalse(self.request.finished)

    def test_cancel_stops_the_upstream(self) -> None:
        from twisted.internet.defer import CancelledError, ensureDeferred

        d = ensureDeferred(self.done)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.response.transport.calls, ["stop"])
        self.assertIn("abort", self.request.events)
        self.assertFalse(self.request.finished)
