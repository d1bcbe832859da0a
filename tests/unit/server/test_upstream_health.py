"""A broken upstream shows in the log once, then as a summary a minute, then as a recovery."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent

from regproxy.config import Upstream
from regproxy.server.upstream_health import UpstreamHealthLog, plain_http_hint


def health() -> tuple[UpstreamHealthLog, Clock, list[dict[str, Any]]]:
    clock = Clock()
    events: list[dict[str, Any]] = []
    return UpstreamHealthLog(clock, log=Logger(observer=events.append)), clock, events


def messages(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(event) for event in events]


def test_first_failure_is_a_warning_with_its_cause() -> None:
    log, _, events = health()
    log.failed("default", "connect", "connection refused by 127.0.0.1:5000")
    assert [event["log_level"] for event in events] == [LogLevel.warn]
    assert messages(events) == [
        "upstream of route default failing: connect: connection refused by 127.0.0.1:5000"
    ]
    assert (events[0]["route"], events[0]["kind"]) == ("default", "connect")


def test_repeated_failures_within_a_minute_are_not_logged() -> None:
    log, clock, events = health()
    for _ in range(100):
        log.failed("default", "connect", "connection refused")
        clock.advance(0.5)
    assert len(events) == 1


def test_a_summary_a_minute_while_failures_go_on() -> None:
    log, clock, events = health()
    log.failed("default", "timeout", "no answer in 30 s")
    for _ in range(130):
        clock.advance(1)
        log.failed("default", "timeout", "no answer in 30 s")
    summaries = messages(events)[1:]
    assert summaries == [
        "upstream of route default still failing: 60 more timeout failures in the last 60 s,"
        " 61 since it began (last: no answer in 30 s)",
        "upstream of route default still failing: 60 more timeout failures in the last 60 s,"
        " 121 since it began (last: no answer in 30 s)",
    ]
    assert all(event["log_level"] is LogLevel.warn for event in events)


def test_each_route_and_kind_is_reported_on_its_own() -> None:
    log, _, events = health()
    log.failed("a", "connect", "refused")
    log.failed("a", "tls", "TLS verification failed for host a.example")
    log.failed("b", "connect", "refused")
    log.failed("a", "connect", "refused")
    assert [(event["route"], event["kind"]) for event in events] == [
        ("a", "connect"),
        ("a", "tls"),
        ("b", "connect"),
    ]


def test_recovery_is_logged_once_with_the_outage_length() -> None:
    log, clock, events = health()
    log.failed("default", "connect", "refused")
    clock.advance(5)
    log.failed("default", "tls", "handshake failed")
    clock.advance(7)
    log.succeeded("default")
    log.succeeded("default")
    assert messages(events)[2:] == [
        "upstream of route default recovered after 12 s and 2 failures (connect, tls)"
    ]
    assert events[2]["log_level"] is LogLevel.info
    assert log.failing("default") == frozenset()


def test_success_without_an_outage_logs_nothing() -> None:
    log, _, events = health()
    log.succeeded("default")
    assert events == []


def test_recovery_of_one_route_leaves_the_others_failing() -> None:
    log, _, events = health()
    log.failed("a", "connect", "refused")
    log.failed("b", "connect", "refused")
    log.succeeded("a")
    assert log.failing("b") == frozenset({"connect"})
    log.failed("a", "connect", "refused")
    assert len(events) == 4  # a new outage of "a" is reported again


def test_hint_is_logged_with_the_first_failure() -> None:
    log, _, events = health()
    log.failed("default", "tls", "handshake failed", hint="try http")
    assert messages(events) == [
        "upstream of route default failing: tls: handshake failed (try http)"
    ]


def test_plain_http_hint_for_a_tls_failure_on_https() -> None:
    upstream = Upstream.from_url("127.0.0.1:5000")
    assert plain_http_hint(upstream, "tls") == (
        "the upstream looks like plain HTTP: try --upstream http://127.0.0.1:5000"
        " (an upstream given without a scheme means https)"
    )


def test_no_plain_http_hint_for_other_failures_or_http_upstreams() -> None:
    assert plain_http_hint(Upstream.from_url("127.0.0.1:5000"), "connect") is None
    assert plain_http_hint(Upstream.from_url("http://127.0.0.1:5000"), "tls") is None


def test_failures_while_the_process_stops_are_not_the_upstreams() -> None:
    log, _, events = health()
    log.quiet()
    log.failed("default", "dns", "the host name does not resolve")
    assert events == []


def test_the_service_quiets_its_health_log_before_shutdown() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from regproxy.tap import Options, makeService

    reactor = MemoryReactorClock()
    options = Options(environ={})
    options.parseOptions(["--upstream", "http://127.0.0.1:5000", "--port", "tcp:0"])
    makeService(options, reactor=reactor, argv=[])
    before = reactor.triggers.get("before", {}).get("shutdown", [])
    assert any(getattr(call[0], "__name__", "") == "quiet" for call in before)
