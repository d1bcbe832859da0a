"""Making a broken upstream visible in the log without flooding it.

A refused connection or a failed TLS handshake happens on every request while it lasts;
logging each one buries everything else, logging none leaves operators with only a metric.
So the first failure of each kind per route is logged at warning level with its cause, the
rest are counted and summarised about once a minute while failures go on, and the first
success afterwards is logged once as a recovery.

The clock is injected (anything with ``seconds()``, such as the reactor or a test's
``Clock``); summaries are emitted from ``failed`` itself when a minute has passed, so the
class schedules nothing and needs no reactor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs
from twisted.logger import Logger

from ..config import Upstream

SUMMARY_INTERVAL = 60.0

# The failure kinds in which a TLS handshake itself failed (as opposed to a certificate that
# did not verify): what an https client sees when the other side speaks plain HTTP.
TLS_HANDSHAKE_KINDS = frozenset({"tls"})


class Clock(Protocol):
    def seconds(self) -> float: ...


@attrs.define
class _Outage:
    """One (route, kind) that is failing: when it began and what is not yet reported."""

    since: float
    window_start: float
    cause: str
    total: int = 1
    unreported: int = 0


def plain_http_hint(upstream: Upstream, kind: str) -> str | None:
    """The hint for an https upstream whose TLS handshake failed: it may speak plain HTTP.

    A bare ``--upstream 127.0.0.1:5000`` means https, while a local distribution registry
    usually serves plain HTTP; the handshake then fails with nothing that says why.
    """
    if upstream.scheme != "https" or kind not in TLS_HANDSHAKE_KINDS:
        return None
    return (
        f"the upstream looks like plain HTTP: try --upstream http://{upstream.netloc} "
        "(an upstream given without a scheme means https)"
    )


class UpstreamHealthLog:
    """Logs upstream failures once per (route, kind), a summary a minute, and recovery."""

    log = Logger()

    def __init__(
        self,
        clock: Clock,
        *,
        summary_interval: float = SUMMARY_INTERVAL,
        log: Logger | None = None,
    ) -> None:
        self.clock = clock
        self.summary_interval = summary_interval
        if log is not None:
            self.log = log
        self._outages: dict[tuple[str, str], _Outage] = {}
        self._quiet = False

    def quiet(self) -> None:
        """The process is stopping: exchanges cut short by the shutdown (a name lookup
        whose thread pool stopped, a connection closed under it) say nothing of the
        upstream, and are not logged as its failures."""
        self._quiet = True

    def failed(self, route: str, kind: str, cause: str, hint: str | None = None) -> None:
        """Record one failed exchange with the upstream of ``route``.

        ``cause`` is a short human sentence (``connection refused``, ``TLS verification
        failed for host gcr.io``); it never holds credentials. ``hint`` is an optional
        suggestion (see ``plain_http_hint``), logged with the first failure only.
        """
        if self._quiet:
            return
        now = self.clock.seconds()
        key = (route, kind)
        outage = self._outages.get(key)
        if outage is None:
            self._outages[key] = _Outage(since=now, window_start=now, cause=cause)
            self.log.warn(
                "upstream of route {route} failing: {kind}: {cause}{hint_text}",
                route=route,
                kind=kind,
                cause=cause,
                hint=hint,
                hint_text=f" ({hint})" if hint else "",
            )
            return
        outage.total += 1
        outage.unreported += 1
        outage.cause = cause
        if now - outage.window_start >= self.summary_interval:
            self.log.warn(
                "upstream of route {route} still failing: {count} more {kind} failures in "
                "the last {seconds:.0f} s, {total} since it began (last: {cause})",
                route=route,
                kind=kind,
                cause=cause,
                count=outage.unreported,
                seconds=now - outage.window_start,
                total=outage.total,
            )
            outage.unreported = 0
            outage.window_start = now

    def succeeded(self, route: str) -> None:
        """Record an exchange that got an answer; ends every outage of ``route``."""
        ended = [key for key in self._outages if key[0] == route]
        if not ended:
            return
        now = self.clock.seconds()
        outages = [self._outages.pop(key) for key in ended]
        self.log.info(
            "upstream of route {route} recovered after {seconds:.0f} s and {total} failures "
            "({kinds})",
            route=route,
            kinds=", ".join(sorted(kind for _, kind in ended)),
            seconds=now - min(outage.since for outage in outages),
            total=sum(outage.total for outage in outages),
        )

    def failing(self, route: str) -> frozenset[str]:
        """The kinds of failure ``route`` is in the middle of (for readiness or status)."""
        return frozenset(kind for name, kind in self._outages if name == route)


class HealthReport:
    """What the upstream client tells about each exchange, to the health log (with the
    plain-HTTP hint where a TLS handshake failed against an https upstream)."""

    def __init__(
        self, log: UpstreamHealthLog, upstream_of: Callable[[str], Upstream | None]
    ) -> None:
        self._log = log
        self._upstream_of = upstream_of

    def failed(self, route: str, kind: object, cause: str) -> None:
        upstream = self._upstream_of(route)
        hint = plain_http_hint(upstream, str(kind)) if upstream is not None else None
        self._log.failed(route, str(kind), cause, hint)

    def succeeded(self, route: str) -> None:
        self._log.succeeded(route)
