"""Rewriting the small JSON bodies that name repositories, and the bounded reader."""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from regproxy.config import Route, Upstream
from regproxy.protocol import bodies
from regproxy.protocol.errors import OCIError
from regproxy.upstream import reading

ROUTE = Route(Upstream("https", "gcr.example"), prefix="proj")


def test_rewrite_tags_replaces_the_name() -> None:
    body = json.dumps({"name": "proj/team/app", "tags": ["a", "b"]}).encode()
    assert json.loads(bodies.rewrite_tags(body, "team/app")) == {
        "name": "team/app",
        "tags": ["a", "b"],
    }


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[1, 2]", b'{"tags": ["a"]}', b"\xff\xfe", b'"proj/a"']
)
def test_rewrite_tags_leaves_other_bodies(body: bytes) -> None:
    assert bodies.rewrite_tags(body, "a") == body


def test_rewrite_catalog_filters_and_strips() -> None:
    body = json.dumps({"repositories": ["proj/a", "proj/team/b"]}).encode()
    rewritten, ran_past = bodies.rewrite_catalog(body, ROUTE.client_name)
    assert json.loads(rewritten) == {"repositories": ["a", "team/b"]}
    assert ran_past is False


def test_rewrite_catalog_ran_past_the_prefix() -> None:
    body = json.dumps({"repositories": ["proj/a", "proj", "projx/c", "zzz", 7]}).encode()
    rewritten, ran_past = bodies.rewrite_catalog(body, ROUTE.client_name)
    assert json.loads(rewritten) == {"repositories": ["a"]}
    assert ran_past is True


@pytest.mark.parametrize("body", [b"", b"<html>", b'{"repositories": "x"}', b"{}"])
def test_rewrite_catalog_leaves_other_bodies(body: bytes) -> None:
    assert bodies.rewrite_catalog(body, ROUTE.client_name) == (body, False)


def test_rewrite_errors_every_string() -> None:
    body = json.dumps(
        {
            "errors": [
                {
                    "code": "NAME_UNKNOWN",
                    "message": "repository name not known to registry",
                    "detail": {"name": "proj/app", "nested": ["proj/app", 3, None]},
                }
            ]
        }
    ).encode()
    rewritten = bodies.rewrite_errors(body, lambda text: text.replace("proj/app", "app"))
    assert json.loads(rewritten) == {
        "errors": [
            {
                "code": "NAME_UNKNOWN",
                "message": "repository name not known to registry",
                "detail": {"name": "app", "nested": ["app", 3, None]},
            }
        ]
    }


@pytest.mark.parametrize("body", [b"proj/app not found", b'{"message": "proj/app"}', b"[]"])
def test_rewrite_errors_leaves_other_bodies(body: bytes) -> None:
    assert bodies.rewrite_errors(body, lambda text: "changed") == body


class BodyTransport(StringTransport):
    """A response body transport that counts stopProducing calls."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = 0

    def stopProducing(self) -> None:
        self.stopped += 1
        super().stopProducing()


class FakeResponse:
    """Just enough IResponse: deliverBody drives the protocol with the given chunks."""

    def __init__(self, chunks: list[bytes], reason: Failure | None = None) -> None:
        self.chunks = chunks
        self.reason = reason if reason is not None else Failure(ResponseDone())
        self.transport = BodyTransport()

    def deliverBody(self, protocol) -> None:  # type: ignore[no-untyped-def]
        protocol.makeConnection(self.transport)
        for chunk in self.chunks:
            protocol.dataReceived(chunk)
        protocol.connectionLost(self.reason)


class OpenResponse:
    """An IResponse whose body stays open: the test sends chunks and ends it when it likes."""

    def __init__(self) -> None:
        self.transport = BodyTransport()
        self.protocol = None

    def deliverBody(self, protocol) -> None:  # type: ignore[no-untyped-def]
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def end(self, reason: Failure | None = None) -> None:
        assert self.protocol is not None
        self.protocol.connectionLost(reason if reason is not None else Failure(ResponseDone()))


IDLE = 5.0


class ReadBoundedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def read(self, response: object, limit: int) -> Deferred[bytes]:
        return reading.read_bounded(response, limit, self.clock, IDLE)  # type: ignore[arg-type]

    def test_within_the_limit(self) -> None:
        response = FakeResponse([b"abc", b"def", b"g"])
        self.assertEqual(self.successResultOf(self.read(response, 7)), b"abcdefg")
        self.assertEqual(response.transport.stopped, 0)
        # The idle timer goes with the body.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_potential_data_loss_is_complete(self) -> None:
        response = FakeResponse([b"abc"], Failure(PotentialDataLoss()))
        self.assertEqual(self.successResultOf(self.read(response, 10)), b"abc")

    def test_over_the_limit(self) -> None:
        response = FakeResponse([b"abcd", b"efgh", b"ij"], Failure(ConnectionLost()))
        failure = self.failureResultOf(self.read(response, 7), OCIError)
        self.assertEqual(failure.value.code, "UPSTREAM_UNAVAILABLE")
        self.assertEqual(failure.value.status, 502)
        self.assertGreaterEqual(response.transport.stopped, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_over_the_limit_even_if_the_body_ends_cleanly(self) -> None:
        response = FakeResponse([b"x" * 11])
        self.failureResultOf(self.read(response, 10), OCIError)
        self.assertEqual(response.transport.stopped, 1)

    def test_broken_body(self) -> None:
        response = FakeResponse([b"abc"], Failure(ConnectionLost()))
        self.failureResultOf(self.read(response, 10), ConnectionLost)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_timeout_before_any_data(self) -> None:
        response = OpenResponse()
        d = self.read(response, 10)
        self.clock.advance(IDLE - 0.1)
        self.assertNoResult(d)
        self.assertEqual(response.transport.stopped, 0)
        self.clock.advance(0.1)
        # The transfer is stopped; the body ends (as twisted ends it) with a lost connection.
        self.assertEqual(response.transport.stopped, 1)
        response.end(Failure(ConnectionLost()))
        failure = self.failureResultOf(d, OCIError)
        self.assertEqual((failure.value.code, failure.value.status), ("UPSTREAM_TIMEOUT", 504))

    def test_idle_timer_is_reset_by_every_chunk(self) -> None:
        response = OpenResponse()
        d = self.read(response, 100)
        # Ten chunks spread over twice the idle timeout: never silent for IDLE seconds.
        for _ in range(10):
            self.clock.advance(IDLE - 1)
            response.send(b"ab")
        self.assertNoResult(d)
        self.assertEqual(response.transport.stopped, 0)
        self.clock.advance(IDLE - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(response.transport.stopped, 1)
        response.end(Failure(ConnectionLost()))
        failure = self.failureResultOf(d, OCIError)
        self.assertEqual(failure.value.code, "UPSTREAM_TIMEOUT")

    def test_stalled_even_if_the_body_then_ends_cleanly(self) -> None:
        # A truncated body must not be taken for a whole one after the timer fired.
        response = OpenResponse()
        d = self.read(response, 100)
        response.send(b'{"name":')
        self.clock.advance(IDLE)
        response.end()
        self.assertEqual(self.failureResultOf(d, OCIError).value.code, "UPSTREAM_TIMEOUT")

    def test_body_ending_in_time_cancels_the_timer(self) -> None:
        response = OpenResponse()
        d = self.read(response, 100)
        response.send(b"abc")
        self.clock.advance(IDLE - 1)
        response.end()
        self.assertEqual(self.successResultOf(d), b"abc")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(IDLE * 2)
        self.assertEqual(response.transport.stopped, 0)
