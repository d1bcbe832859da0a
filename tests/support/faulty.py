"""An HTTP relay in front of a real registry that holds, refuses or spoils chosen requests.

Races between the proxy's clients become deterministic when the upstream answers one of
them only once another has reached it: the test names, per request, what to wait for and
whether to answer, hang up or send wrong bytes. Everything else is relayed as the
registry answered it, streamed, multi-valued headers kept.
"""

from __future__ import annotations

import contextlib
import http.client
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Hop-by-hop headers (RFC 9110 7.6.1): each leg of the relay has its own.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# How long a held request waits for its condition before it is let go anyway, so that a
# proxy that never sends the awaited request fails its test instead of hanging it.
HOLD_LIMIT = 10.0


@dataclass
class Seen:
    """One request the relay received, and what became of it."""

    method: str
    path: str
    authorization: str | None
    # The registry's status as relayed; None while outstanding, and for a refused request.
    status: int | None = None
    refused: bool = False
    # Held past HOLD_LIMIT without its condition: the race the test meant did not happen.
    overdue: bool = False

    @property
    def answered(self) -> bool:
        return self.status is not None or self.refused


@dataclass(frozen=True)
class Hold:
    """What to do with a request: wait until ``until()`` holds (checked whenever another
    request is answered), then ``grace`` seconds more, then relay it or, with ``refuse``,
    close the connection without an answer. With ``corrupt`` the body's first byte is
    flipped (the length stays right): an upstream, or a CDN, sending wrong bytes."""

    until: Callable[[], bool] = lambda: True
    grace: float = 0.0
    refuse: bool = False
    corrupt: bool = False


Rule = Callable[[Seen], Hold | None]


@dataclass
class FaultyUpstream:
    """The relay on 127.0.0.1; ``rule`` (settable at any time) picks a :class:`Hold` for a
    request, None to relay it at once. A context manager."""

    target_port: int
    rule: Rule | None = None
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._changed = threading.Condition()
        handler: Any = type("Handler", (_Handler,), {"owner": self})
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultyUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            self.rule = None
            self._changed.notify_all()
        self._server.shutdown()
        self._thread.join(5)
        self._server.server_close()

    # -- what the tests ask ------------------------------------------------------------

    def requests(self, predicate: Callable[[Seen], bool] = lambda seen: True) -> list[Seen]:
        with self._changed:
            return [seen for seen in self.seen if predicate(seen)]

    def answered(self, predicate: Callable[[Seen], bool]) -> bool:
        return any(seen.answered for seen in self.requests(predicate))

    # -- the handler's side --------------------------------------------------------------

    def _arrived(self, seen: Seen) -> Hold | None:
        with self._changed:
            self.seen.append(seen)
            self._changed.notify_all()
            rule = self.rule
        return rule(seen) if rule is not None else None

    def _wait(self, seen: Seen, hold: Hold) -> None:
        deadline = time.monotonic() + HOLD_LIMIT
        with self._changed:
            while not hold.until() and self.rule is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    seen.overdue = True
                    break
                self._changed.wait(min(left, 0.1))
        if hold.grace:
            time.sleep(hold.grace)

    def _done(self, seen: Seen, status: int | None) -> None:
        with self._changed:
            seen.status = status
            seen.refused = status is None
            self._changed.notify_all()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # The proxy drops pooled connections as it pleases (and at its stop): not news.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    owner: FaultyUpstream
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._relay()

    def do_HEAD(self) -> None:
        self._relay()

    def _relay(self) -> None:
        owner = self.owner
        seen = Seen(self.command, self.path, self.headers.get("Authorization"))
        hold = owner._arrived(seen)
        if hold is not None:
            owner._wait(seen, hold)
            if hold.refuse:
                # No status line at all: to the proxy, a connection that failed.
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(2)
                owner._done(seen, None)
                return
        upstream = http.client.HTTPConnection("127.0.0.1", owner.target_port, timeout=60)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP:
                    upstream.putheader(name, value)
            upstream.endheaders()
            response = upstream.getresponse()
            self.send_response_only(response.status, response.reason)
            headers = [(n, v) for n, v in response.getheaders() if n.lower() not in _HOP]
            has_length = any(n.lower() == "content-length" for n, _ in headers)
            body = b""
            if not has_length and self.command != "HEAD":
                body = response.read()  # only small error bodies come without a length
                headers.append(("Content-Length", str(len(body))))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            spoil = hold is not None and hold.corrupt
            while chunk := body or response.read(64 * 1024):
                body = b""
                if spoil:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                    spoil = False
                self.wfile.write(chunk)
            owner._done(seen, response.status)
        finally:
            upstream.close()
