"""Collector-ready logs: one JSON object per line, and twist made to write them."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from twisted.application.twist._options import TwistOptions
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from regproxy.server.logs import (
    LogFormat,
    choose_twist_log_observer,
    json_line,
    json_lines_per_turn,
    jsonLineFileLogObserver,
    text_lines_per_turn,
)
from regproxy.tap import Options

ACCESS = {
    "log_namespace": "regproxy.access",
    "log_level": LogLevel.info,
    "log_time": 1796045152.25,
    "log_format": "{line}",
    "line": "127.0.0.1 GET /v2/ 200 2 0.001s",
    "request_id": "abc",
    "client": "127.0.0.1",
    "method": "GET",
    "path": "/v2/",
    "status": 200,
    "bytes": 2,
    "duration": 0.001,
    "upstream_status": None,
    "route": "default",
}


def test_access_event_is_one_flat_json_line() -> None:
    line = json_line(ACCESS)
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {
        "time": "2026-11-30T13:25:52.250Z",
        "severity": "INFO",
        "message": "127.0.0.1 GET /v2/ 200 2 0.001s",
        "logger": "regproxy.access",
        "request_id": "abc",
        "client": "127.0.0.1",
        "method": "GET",
        "path": "/v2/",
        "status": 200,
        "bytes": 2,
        "duration": 0.001,
        "upstream_status": None,
        "route": "default",
    }


@pytest.mark.parametrize(
    ("level", "severity"),
    [
        (LogLevel.debug, "DEBUG"),
        (LogLevel.info, "INFO"),
        (LogLevel.warn, "WARNING"),
        (LogLevel.error, "ERROR"),
        (LogLevel.critical, "CRITICAL"),
    ],
)
def test_severity_is_a_plain_cloud_logging_string(level: LogLevel, severity: str) -> None:
    assert json.loads(json_line({**ACCESS, "log_level": level}))["severity"] == severity


def test_no_record_separator_and_no_twisted_internals() -> None:
    line = json_line({**ACCESS, "log_logger": object(), "log_source": object()})
    assert "\x1e" not in line
    assert not [key for key in json.loads(line) if key.startswith(("log_", "__"))]


def test_objects_never_become_fields() -> None:
    class Secretive:
        def __repr__(self) -> str:
            return "Secretive(token=s3cr3t)"

    line = json_line({**ACCESS, "factory": Secretive(), "nan": float("nan")})
    assert "s3cr3t" not in line
    assert "factory" not in json.loads(line) and "nan" not in json.loads(line)


def test_a_failure_is_in_the_message_and_the_line_stays_one_line() -> None:
    events: list[dict[str, Any]] = []
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        Logger(observer=events.append).failure("relay failed for {route}", route="r1")
    line = json_line(events[0])
    assert line.count("\n") == 1
    record = json.loads(line)
    assert record["severity"] == "CRITICAL"
    assert record["message"].startswith("relay failed for r1")
    assert "ValueError: boom" in record["message"]
    assert record["route"] == "r1"


def test_every_line_a_file_observer_writes_parses() -> None:
    out = io.StringIO()
    observer = jsonLineFileLogObserver(out)
    observer(ACCESS)
    observer({"log_format": "non-ASCII path \u00e9 {x}", "x": "\u2603", "log_time": 0.0})
    observer({"log_failure": Failure(RuntimeError("x")), "log_format": "oops", "log_time": 0})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    for line in lines:
        assert isinstance(json.loads(line), dict)
        assert line.isascii()


def twist_options(*argv: str) -> TwistOptions:
    """twist's own option parsing, as ``twist ARGV`` does it (without a real reactor)."""
    options = TwistOptions()
    options["reactor"] = MemoryReactorClock()
    options.parseOptions(list(argv))
    return options


def test_twist_still_chooses_its_observer_from_its_options() -> None:
    """The one twist detail regproxy relies on (regproxy.server.logs): if this fails,
    twist changed."""
    options = twist_options("--log-format", "json", "regproxy")
    assert isinstance(options.subOptions, Options)
    assert options.subOptions.parent is options
    assert "fileLogObserverFactory" in options
    choose_twist_log_observer(options, None)
    assert options["fileLogObserverFactory"] is json_lines_per_turn


def test_twist_text_format_stays_text() -> None:
    options = twist_options("--log-format", "text", "regproxy")
    choose_twist_log_observer(options, None)
    assert options["fileLogObserverFactory"] is text_lines_per_turn


def test_plugin_option_wins_over_twist_choice() -> None:
    options = twist_options("--log-format", "text", "regproxy", "--log-format", "json")
    choose_twist_log_observer(options, options.subOptions["log-format"])
    assert options["fileLogObserverFactory"] is json_lines_per_turn
    options = twist_options("--log-format", "json", "regproxy", "--log-format", "text")
    choose_twist_log_observer(options, options.subOptions["log-format"])
    assert options["fileLogObserverFactory"] is text_lines_per_turn


def test_other_runners_are_left_alone() -> None:
    foreign: dict[str, Any] = {"logfile": "x"}
    choose_twist_log_observer(foreign, LogFormat.JSON)
    assert foreign == {"logfile": "x"}


@pytest.mark.parametrize("line", ["1.2.3.4 GET /v2/{x} 200 5 0.001s", "ünïcode %s {0} {line}", ""])
def test_an_access_line_is_the_message_eventAsText_would_make(line: str) -> None:
    from twisted.logger import eventAsText

    event = {**ACCESS, "log_format": "{line}", "line": line}
    expected = eventAsText(
        event, includeTraceback=True, includeTimestamp=False, includeSystem=False
    )
    assert json.loads(json_line(event))["message"] == expected == line


def test_log_lines_of_one_reactor_turn_leave_in_one_write() -> None:
    """FileLogObserver writes and flushes every event: with PYTHONUNBUFFERED, a write
    system call per request (the access line)."""
    import io

    from twisted.internet.task import Clock

    from regproxy.server.logs import OncePerTurn

    class Counting(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            Counting.writes += 1
            return super().write(text)

    out, clock = Counting(), Clock()
    batched = OncePerTurn(out, clock.callLater, limit=1000)
    for line in ("a\n", "b\n", "c\n"):
        batched.write(line)
        batched.flush()
    assert out.getvalue() == "" and Counting.writes == 0
    clock.advance(0)
    assert out.getvalue() == "a\nb\nc\n" and Counting.writes == 1
    batched.write("x" * 1000)  # past the limit: written at once, not held
    assert Counting.writes == 2 and clock.getDelayedCalls() == []


def test_twisted_s_echoes_of_regproxy_s_lines_are_quiet() -> None:
    """tcp.Port's "starting on" and "Port N Closed", a noisy factory's start and stop go;
    errors through the same legacy log, and regproxy's own lines, stay."""
    from twisted.internet.protocol import Factory
    from twisted.logger import globalLogPublisher
    from twisted.python import log as legacy

    from regproxy.server.logs import without_twisted_echoes

    captured: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    try:
        # What twisted.internet.tcp.Port and unix.Port say, through the same call.
        legacy.msg("ProxySite starting on 8080")
        legacy.msg("ProxySite (TLS) starting on 8443")
        legacy.msg("(TCP Port 8080 Closed)")
        legacy.msg("(UNIX Port '/run/regproxy.sock' Closed)")
        factory = Factory()
        factory.noisy = True
        factory.doStart()
        factory.doStop()
        legacy.msg("kept: something else")
        legacy.err(RuntimeError("kept: starting on 1"), "Unhandled Error")
        Logger(namespace="regproxy.server.listen.Listener").info(
            "listening on {address} (registry API; --port tcp:8080)", address="0.0.0.0:8080"
        )
    finally:
        globalLogPublisher.removeObserver(captured.append)
    out = io.StringIO()
    observer = without_twisted_echoes(jsonLineFileLogObserver(out))
    for event in captured:
        observer(event)
    messages = [json.loads(line)["message"] for line in out.getvalue().splitlines()]
    assert messages[0] == "kept: something else"
    assert messages[1].startswith("Unhandled Error")
    assert messages[2] == "listening on 0.0.0.0:8080 (registry API; --port tcp:8080)"
    assert len(messages) == 3
