"""Listeners: one-line failures naming the option, the bound address, a late close."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.web.resource import Resource

from regproxy.server.listen import Listener, explain_listen_failure, parse_endpoint
from regproxy.server.startup import StartupError
from regproxy.web.observe import ClientAddress, Metrics
from regproxy.web.site import ProxySite


def site() -> ProxySite:
    return ProxySite(Resource(), metrics=Metrics(), client_address=ClientAddress(()))


def listener(
    reactor: MemoryReactorClock, description: str, **kwargs: Any
) -> tuple[Listener, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    service = Listener(
        option="--port",
        description=description,
        endpoint=parse_endpoint(reactor, "--port", description),
        factory=site(),
        reactor=reactor,
        **kwargs,
    )
    service.log = Logger(observer=events.append)
    return service, events


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:notaport", "--port tcp:notaport: 'notaport' is not a port number; give a port"),
        ("8084x", "--port 8084x: Unknown endpoint type: '8084x'; give a port number"),
        ("systemd:domain=INET:index=0", "--port systemd:domain=INET:index=0: the supervisor"),
    ],
)
def test_bad_endpoints_are_one_line_naming_the_option(
    description: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(StartupError) as caught:
        parse_endpoint(MemoryReactorClock(), "--port", description)
    assert str(caught.value).startswith(expected)
    assert "\n" not in str(caught.value)


def test_bound_address_is_reported() -> None:
    reactor = MemoryReactorClock()
    service, events = listener(reactor, "tcp:8080:interface=127.0.0.1")
    service.startService()
    assert reactor.tcpServers[0][:1] == (8080,)
    # The memory reactor's ports say 0.0.0.0 whatever the interface: the address is the
    # port's own, as bound (tests/integration/test_operations.py sees a real one).
    assert [formatEvent(e) for e in events] == [
        "listening on 0.0.0.0:8080 (registry API; --port tcp:8080:interface=127.0.0.1)"
    ]


def test_all_interfaces_with_credentials_is_a_warning() -> None:
    reactor = MemoryReactorClock()
    service, events = listener(reactor, "tcp:8080", warn_all_interfaces="credentials held")
    service.startService()
    assert [e["log_level"] for e in events] == [LogLevel.info, LogLevel.warn]
    assert formatEvent(events[1]) == "0.0.0.0:8080 is every interface of this host: " + (
        "credentials held"
    )


def test_all_interfaces_without_credentials_is_fine() -> None:
    reactor = MemoryReactorClock()
    service, events = listener(reactor, "tcp:8080")
    service.startService()
    assert [e["log_level"] for e in events] == [LogLevel.info]


@pytest.mark.parametrize(
    ("number", "words"),
    [
        (errno.EADDRINUSE, "already in use"),
        (errno.EACCES, "ports below 1024 need privileges"),
        (errno.EADDRNOTAVAIL, "interface="),
    ],
)
def test_listen_failures_say_what_to_do(number: int, words: str) -> None:
    error = CannotListenError("", 80, OSError(number, "x"))
    assert words in explain_listen_failure(error)


def test_listeners_keep_accepting_for_the_close_delay() -> None:
    reactor = MemoryReactorClock()
    service, _ = listener(reactor, "tcp:8080", close_delay=5.0)
    service.startService()
    port = reactor.tcpServers[0]
    stopped = service.stopService()
    assert stopped is not None
    done: list[object] = []
    stopped.addBoth(done.append)
    reactor.advance(4.9)
    assert not done
    assert port in reactor.tcpServers
    reactor.advance(0.1)
    assert done == [None]


def test_listeners_close_at_once_without_a_delay() -> None:
    reactor = MemoryReactorClock()
    service, _ = listener(reactor, "tcp:8080")
    service.startService()
    done: list[object] = []
    maybeDeferred(service.stopService).addBoth(done.append)
    assert done == [None]


def test_unnamed_sockets_from_a_supervisor_are_named_as_the_problem() -> None:
    with pytest.raises(StartupError) as caught:
        parse_endpoint(
            MemoryReactorClock(),
            "--port",
            "systemd:domain=INET:index=0",
            {"LISTEN_FDS": "1", "LISTEN_PID": "1"},
        )
    assert "without names (no LISTEN_FDNAMES)" in str(caught.value)
