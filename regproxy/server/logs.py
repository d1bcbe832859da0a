"""Log output that collectors take as it is: one JSON object per line, or plain text.

``twist`` writes its own JSON whenever stdout is not a terminal (containers, systemd,
Kubernetes, ``nohup``): RFC 7464 records that start with a ``\\x1e`` separator and carry
internal fields (``log_flattened``, ``__class_uuid__``), which Cloud Logging, Loki,
fluent-bit and Elastic do not parse as JSON. regproxy's JSON is one object per line with
``time`` (RFC 3339, UTC), ``severity`` (``INFO``, ``WARNING``, ``ERROR``, as Cloud Logging
reads it), ``message``, ``logger`` and the event's own plain fields, flat (an access event's
``method``, ``path``, ``status``, ``bytes``, ``duration``, ...).
"""

from __future__ import annotations

import atexit
import enum
import json
import re
import time
from collections.abc import Callable, MutableMapping
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    PredicateResult,
    eventAsText,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import implementer


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"

    def __str__(self) -> str:
        return str(self.value)


SEVERITY = {
    LogLevel.debug: "DEBUG",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARNING",
    LogLevel.error: "ERROR",
    LogLevel.critical: "CRITICAL",
}

# Keys that are the logging system's own, or that the JSON line already says otherwise
# (legacy twisted.python.log events carry "message" as a tuple, "isError", "system").
_RESERVED = frozenset(
    {"time", "severity", "message", "logger", "format", "isError", "system", "why", "line"}
)
_PLAIN = (str, int, float, bool, type(None))


def rfc3339(timestamp: float | None) -> str:
    """``2026-11-29T14:33:21.867Z``. (time.strftime: a fifth of datetime's cost, and this
    runs once per request.)"""
    seconds = timestamp or 0.0
    whole = int(seconds)
    millis = int((seconds - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def json_line(event: LogEvent) -> str:
    """One event as one line of JSON that parses by itself.

    Only plain values (strings, numbers, booleans, null) become fields: objects in events
    (factories, failures, protocols) have no stable JSON form and may hold secrets.
    """
    level = event.get("log_level", LogLevel.info)
    line = event.get("line")
    if (
        event.get("log_format") == "{line}"
        and isinstance(line, str)
        and "log_failure" not in event
    ):
        # An access event (regproxy.web.site) carries its rendered line: it is the text
        # eventAsText would make of "{line}", without formatting the event again (a few
        # per cent of the CPU of a manifest GET).
        message = line
    else:
        message = eventAsText(
            event, includeTraceback=True, includeTimestamp=False, includeSystem=False
        )
    record: dict[str, Any] = {
        "time": rfc3339(event.get("log_time")),
        "severity": SEVERITY.get(level, "DEFAULT"),
        "message": message,
        "logger": event.get("log_namespace", "-"),
    }
    plain = event.get("plain_fields")
    if isinstance(plain, tuple):
        # The emitter vouches that these are plain values (regproxy.web.site's access
        # events): no need to sort through the whole event.
        for key in plain:
            record[key] = event.get(key)
    else:
        for key, value in event.items():
            if key.startswith("log_") or key in _RESERVED or not isinstance(value, _PLAIN):
                continue
            if isinstance(value, float) and value != value:  # NaN is not JSON
                continue
            record[key] = value
    # ensure_ascii: the line stays one line and valid whatever bytes a client sent.
    return json.dumps(record, ensure_ascii=True, allow_nan=False, default=str) + "\n"


def jsonLineFileLogObserver(out: IO[Any]) -> FileLogObserver:
    """A ``FileLogObserver`` that writes one JSON object per line to ``out``."""
    return FileLogObserver(out, json_line)


ObserverFactory = Callable[[IO[Any]], ILogObserver]


class OncePerTurn:
    """A log file written once per reactor turn.

    ``FileLogObserver`` writes and flushes every event, and regproxy runs with
    ``PYTHONUNBUFFERED`` (systemd unit, image): under load that is a ``write`` system call
    per request (its access line). Here the lines of one turn of the reactor are kept (up
    to ``limit`` characters) and written together by a ``callLater(0)``, a moment later, in
    one system call. Lines still held when the process exits are written by ``close``
    (at exit) at the latest.
    """

    def __init__(
        self, out: IO[Any], call_later: Callable[..., Any], *, limit: int = 64 * 1024
    ) -> None:
        self._out = out
        self._call_later = call_later
        self._limit = limit
        self._held: list[str] = []
        self._size = 0
        self._pending: Any = None
        atexit.register(self._write)

    def write(self, text: str) -> None:
        self._held.append(text)
        self._size += len(text)
        if self._size >= self._limit:
            self._write()

    def flush(self) -> None:
        if self._pending is None and self._held:
            self._pending = self._call_later(0, self._turn_over)

    def _turn_over(self) -> None:
        self._pending = None
        self._write()

    def write_held(self) -> None:
        """Write what is held now (the process is stopping)."""
        self._write()

    def _write(self) -> None:
        if not self._held:
            return
        text, self._held, self._size = "".join(self._held), [], 0
        self._out.write(text)
        self._out.flush()


def flushed_once_per_turn(out: IO[Any]) -> Any:
    """``out`` with its flushes batched per reactor turn (see ``OncePerTurn``).

    twist builds its observer after the reactor is installed and hands in only the file:
    the global reactor is the one that will run.
    """
    from twisted.internet import reactor

    batched = OncePerTurn(out, reactor.callLater)
    # The last lines of a stopping process (the supervisor's "every worker drained") are
    # written as the reactor shuts down, not only at the interpreter's exit.
    reactor.addSystemEventTrigger("after", "shutdown", batched.write_held)
    return batched


# What Twisted says of listening ports and factories, which regproxy's own lines say
# better ("listening on ... (registry API; --port ...)", the drain): tcp.Port's
# "ProxySite starting on 8080" and "(TCP Port 8080 Closed)" through the legacy log, and
# Factory's "Starting factory"/"Stopping factory" of factories left noisy (treq's).
_TWISTED_PORT_LINES = re.compile(r"(?:\S.* starting on \S+|\((?:TCP|UNIX) Port \S+ Closed\))")
_TWISTED_FACTORY_FORMATS = frozenset(
    {"Starting factory {factory!r}", "Stopping factory {factory!r}"}
)


# PredicateResult's constants (constantly has no types).
_NO: object = PredicateResult.no
_MAYBE: object = PredicateResult.maybe


@implementer(ILogFilterPredicate)
class TwistedEchoes:
    """Drops Twisted's own lines about ports and factories; everything else passes."""

    def __call__(self, event: LogEvent) -> object:
        if event.get("log_format") in _TWISTED_FACTORY_FORMATS:
            return _NO
        if (
            event.get("log_namespace") == "log_legacy"
            and not event.get("isError")
            and _TWISTED_PORT_LINES.fullmatch(formatEvent(event))
        ):
            return _NO
        return _MAYBE


def without_twisted_echoes(observer: ILogObserver) -> ILogObserver:
    return FilteringLogObserver(observer, [TwistedEchoes()])


def json_lines_per_turn(out: IO[Any]) -> ILogObserver:
    """JSON lines (``jsonLineFileLogObserver``), flushed once per reactor turn, without
    Twisted's echoes of regproxy's lines (``TwistedEchoes``)."""
    return without_twisted_echoes(jsonLineFileLogObserver(flushed_once_per_turn(out)))


def text_lines_per_turn(out: IO[Any]) -> ILogObserver:
    """Twist's text lines (``textFileLogObserver``), flushed once per reactor turn, without
    Twisted's echoes of regproxy's lines (``TwistedEchoes``)."""
    return without_twisted_echoes(textFileLogObserver(flushed_once_per_turn(out)))


def choose_twist_log_observer(
    twist_options: MutableMapping[str, Any], chosen: LogFormat | None
) -> None:
    """Make ``twist`` log in ``chosen`` format, or in clean JSON where it picked its own JSON.

    twist offers no public hook for a plugin's log format: it builds its observer, after
    ``makeService``, from ``fileLogObserverFactory`` in its own options, which are the
    plugin options' ``parent`` (``twisted.application.twist._options.TwistOptions``). This is
    the only place regproxy relies on that; ``tests/unit/server/test_logs.py`` fails if twist
    changes it, and under any other runner (``twistd``, tests) nothing happens.
    """
    if "fileLogObserverFactory" not in twist_options:
        return
    if chosen is None:
        chosen = LogFormat.JSON if twist_options.get("logFormat") == "json" else LogFormat.TEXT
    factory: ObserverFactory
    factory = json_lines_per_turn if chosen is LogFormat.JSON else text_lines_per_turn
    twist_options["fileLogObserverFactory"] = factory
    twist_options["logFormat"] = str(chosen)
