"""The Site and Request classes: body limits, request ids, access events and metrics."""

from __future__ import annotations

import itertools
import secrets
import time
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, ISSLTransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ..protocol.errors import OCIError
from .framing import framing_error, refuse_and_close
from .observe import ClientAddress, Metrics, access_log
from .record import RequestRecord

SERVER = b"regproxy"
ACCESS_FIELDS = (
    "request_id",
    "client",
    "method",
    "path",
    "status",
    "bytes",
    "duration",
    "upstream_status",
    "route",
    "endpoint",
    "error_kind",
    "complete",
    "cache",
    "user",
)
ACCESS_FIELDS_WORKER = (*ACCESS_FIELDS, "worker")
# Error kinds that are the client's doing (see regproxy.upstream.body and run_async).
CLIENT_KINDS = frozenset({"client_gone", "client_stalled"})
# The error kind of a manifest request refused by [limits] (regproxy.web.registry).
RATE_LIMITED = "rate_limited"
CONNECTION_DONE = Failure(ConnectionDone())
# Seconds a client connection may stay silent between requests (nginx's keepalive_timeout
# is 75, its client_header_timeout 60); --idle-timeout sets it.
IDLE_TIMEOUT = 60.0
# Header lines that may not be folded (obs-fold): they decide where a request ends.
FOLD_REFUSED = frozenset({b"transfer-encoding", b"content-length", b"host"})
# The only request bodies the proxy reads are OAuth2 token forms.
MAX_REQUEST_BODY = 64 * 1024


# Request ids: a random prefix per process and a counter, 16 hex digits, unique across
# workers and restarts without asking the kernel for randomness on every request.
_ID_PREFIX = secrets.token_hex(4)
_ids = itertools.count(1)


def next_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ids) & 0xFFFFFFFF:08x}"


class ProxyRequest(Request):
    site: ProxySite

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_id = next_request_id()
        self.record = RequestRecord()
        self._received = 0
        # Set once the request was refused at the framing level: nothing more of it is read.
        self._refused = False
        self._started = time.monotonic()

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        # twisted.web announces its version in Server; a proxy on the internet need not.
        if name in (b"Server", b"server"):
            value = SERVER
        super().setHeader(name, value)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_REQUEST_BODY:
            self._refuse(OCIError("REQUEST_INVALID", "request body too large", status=413))
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return  # bytes of a refused request that were already on their way
        self._received += len(data)
        if self._received > MAX_REQUEST_BODY:
            self._refuse(OCIError("REQUEST_INVALID", "request body too large", status=413))
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        error = framing_error(command, self.requestHeaders, version)
        if error is not None:
            self._refuse(error, head=command == b"HEAD", method=command, path=path)
            return
        super().requestReceived(command, path, version)

    def _refuse(
        self, error: OCIError, head: bool = False, method: bytes = b"-", path: bytes = b"-"
    ) -> None:
        """Answer at once and hang up: reading on would be the sender's game."""
        if self._refused or self.startedWriting or self.channel is None:
            return
        self._refused = True
        self.startedWriting = True
        transport = self.channel.transport
        refuse_and_close(transport, error, head=head)
        # Never processed, so no access event would say it happened: say it here.
        site: ProxySite = self.channel.site  # type: ignore[attr-defined]
        peer = getattr(transport.getPeer(), "host", "-") if transport is not None else "-"
        shown = method.decode("latin-1")[:16]
        # Never the query, as for every access event.
        shown_path = path.partition(b"?")[0].decode("latin-1")[:512]
        site.metrics.observe_request(
            route="none",
            endpoint="other",
            method=shown if shown in ("GET", "HEAD", "POST") else "other",
            status=error.status,
            sent=0,
            duration=0.0,
            upstream_seconds=None,
            upstream_error=None,
        )
        access_log.info(
            "{line}",
            line=f"{peer} {shown} {shown_path} {error.status} refused: {error.message}"
            f" id={self.request_id}",
            request_id=self.request_id,
            client=peer,
            method=shown,
            path=shown_path,
            status=error.status,
            bytes=0,
            route="none",
            endpoint="other",
            error_kind="refused",
            complete=True,
        )

    # The channel told that this request is being answered (it is gone from the request
    # by the time the request's watchers run, so it is kept here to tell it the end).
    _answered_on: ProxyChannel | None = None

    def process(self) -> None:
        channel = self.channel
        if isinstance(channel, ProxyChannel):
            channel.request_answering()
            self._answered_on = channel
        self.site = self.channel.site  # type: ignore[attr-defined]
        self.site.active += 1
        metrics = self.site.metrics
        metrics.in_flight.inc()
        self._started = time.monotonic()
        self.notifyFinish().addBoth(self._done)
        self.setHeader(b"x-request-id", self.request_id.encode("ascii"))
        super().process()

    def _done(self, result: Failure | None) -> None:
        if self._answered_on is not None:
            self._answered_on.request_answered()
            self._answered_on = None
        site = self.site
        site.active -= 1
        metrics = site.metrics
        metrics.in_flight.dec()
        exchange = self.record
        duration = time.monotonic() - self._started
        if result is not None and exchange.error_kind is None:
            # The client closed first; the request's own errback may not have run yet.
            exchange.error_kind = "client_gone"
        upstream_error = exchange.error_kind
        if upstream_error in CLIENT_KINDS:
            upstream_error = None  # the client's doing, not the upstream's
        elif upstream_error == RATE_LIMITED:
            metrics.rate_limited.labels(exchange.route or "none").inc()
            upstream_error = None  # [limits] refused it; the upstream was not asked
        # 499 only when the client closed first; when the proxy cut the connection because
        # the upstream failed mid-body, the event keeps the status that was sent.
        status = self.code if result is None or upstream_error is not None else 499
        method = self.method.decode("latin-1")
        if method not in ("GET", "HEAD", "POST"):
            method = "other"  # bounded label values, whatever scanners send
        route, endpoint = exchange.route or "none", exchange.endpoint
        metrics.observe_request(
            route=route,
            endpoint=endpoint,
            method=method,
            status=status,
            sent=self.sentLength,
            duration=duration,
            upstream_seconds=exchange.upstream_seconds,
            upstream_error=upstream_error,
        )
        peer = getattr(self.getClientAddress(), "host", "-")
        client = site.client_address.resolve(
            peer, self.requestHeaders.getRawHeaders(b"x-forwarded-for")
        )
        # Never the query: token requests may carry account names and such.
        path = self.path.decode("latin-1")[:512]
        logged_method = self.method.decode("latin-1")[:16]
        # The readable line is rendered here, once; the format names only it, so the JSON
        # observer does not re-render every field (the fields stay keys of the event).
        failure = f" error={exchange.error_kind}" if exchange.error_kind else ""
        if exchange.cache:
            failure += f" cache={exchange.cache}"
        if exchange.user:
            failure += f" user={exchange.user}"
        # --workers: which worker answered (absent in a single process).
        extra = {} if site.worker is None else {"worker": site.worker}
        worker = "" if site.worker is None else f" worker={site.worker}"
        access_log.info(
            "{line}",
            line=f"{client} {logged_method} {path} {status} {self.sentLength} {duration:.3f}s"
            f" upstream={exchange.upstream_status} route={route} id={self.request_id}{failure}"
            f"{worker}",
            request_id=self.request_id,
            client=client,
            method=logged_method,
            path=path,
            status=status,
            bytes=self.sentLength,
            duration=duration,
            upstream_status=exchange.upstream_status,
            route=route,
            endpoint=endpoint,
            # What went wrong, when something did: connect, tls, timeout, ..., client_gone.
            error_kind=exchange.error_kind,
            complete=result is None,
            cache=exchange.cache,
            # The principal with [auth] (never a password or a token).
            user=exchange.user,
            # Every field above is a plain JSON value: the JSON observer takes them as they
            # are instead of sorting through the whole event (a few per cent of a hit's CPU).
            plain_fields=ACCESS_FIELDS if site.worker is None else ACCESS_FIELDS_WORKER,
            **extra,
        )


class ProxyChannel(HTTPChannel):
    """Answers a TLS handshake on a plain-HTTP listener at once instead of letting it hang.

    Clients that try https first (skopeo, podman, containerd with a plain-http mirror)
    otherwise wait out their handshake timeout before falling back to http: the HTTP
    parser sees no line ending in a ClientHello and keeps waiting for more.
    """

    _first = True
    # Requests being answered (between ProxyRequest.process and their end). A count, not a
    # flag: Twisted starts a pipelined request (requestDone) before it tells the finished
    # one's watchers (notifyFinish), so the two overlap for a moment.
    _answering = 0
    # The deadline of the request now arriving: it must be whole (head and body) within
    # the idle timeout of its first byte. Twisted's idle timer restarts with every byte,
    # so one byte every minute would hold a connection for ever (slowloris); this is
    # nginx's client_header_timeout and client_body_timeout.
    _arrival_deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.open_channels.add(self)  # type: ignore[attr-defined]

    _host: Any = None

    def getHost(self) -> Any:
        # Asked once per request by twisted.web (a getsockname() each time); a connection's
        # own address never changes.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        self.site.open_channels.discard(self)  # type: ignore[attr-defined]
        self._cancel_arrival_deadline()
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if self._first:
            self._first = False
            if data[:1] == b"\x16" and not ISSLTransport.providedBy(self.transport):
                self.transport.write(  # type: ignore[union-attr]
                    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
                )
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
        if not self._answering and self._arrival_deadline is None and self.timeOut:
            self._arrival_deadline = self.callLater(self.timeOut, self._arrived_too_slowly)
        super().dataReceived(data)

    # The last header line that was not itself a continuation: what a folded line continues
    # (its name is worked out only then: folded lines are rare, header lines are not).
    _header_line = b""
    # Set once a folded framing header was refused: nothing more is read.
    _refused_framing = False

    def lineReceived(self, line: bytes) -> None:
        if self._refused_framing:
            return
        if line[:1] in (b" ", b"\t"):
            if self._header_line.partition(b":")[0].strip().lower() in FOLD_REFUSED:
                # A front proxy that does not unfold obs-fold lines would read this
                # Transfer-Encoding or Content-Length differently: request smuggling.
                self._refused_framing = True
                error = OCIError("REQUEST_INVALID", "a framing header is folded over lines")
                refuse_and_close(self.transport, error, head=False)
                return
        else:
            self._header_line = line
        super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused_framing:
            super().rawDataReceived(data)

    def request_answering(self) -> None:
        """The request arrived whole and is being answered: no deadline while it is."""
        self._answering += 1
        self._cancel_arrival_deadline()

    def request_answered(self) -> None:
        self._answering -= 1

    def _cancel_arrival_deadline(self) -> None:
        if self._arrival_deadline is not None and self._arrival_deadline.active():
            self._arrival_deadline.cancel()
        self._arrival_deadline = None

    def _arrived_too_slowly(self) -> None:
        self._arrival_deadline = None
        if self._answering:
            return
        error = OCIError(
            "REQUEST_INVALID",
            f"the request did not arrive whole within {self.timeOut:g} seconds",
            status=408,
        )
        refuse_and_close(self.transport, error, head=False)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line or header past the limit: say so instead of hanging up silently."""
        self.answer_bad_request()

    def answer_bad_request(self) -> None:
        """400 with an OCI body, then hang up: Twisted's own answer has no body, and
        clients and operators get the same error shape as everywhere else."""
        body = OCIError("REQUEST_INVALID", "malformed or oversized HTTP request").body()
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        self.loseConnection()

    # HTTPChannel answers every malformed request through this private method and offers no
    # public hook for the answer. This is regproxy's one use of it; tests/unit/web/test_site.py
    # (test_malformed_requests_get_an_oci_error) fails if Twisted stops calling it.
    _respondToBadRequestAndDisconnect = answer_bad_request


class ProxySite(Site):
    requestFactory = ProxyRequest
    protocol = ProxyChannel  # type: ignore[assignment]
    # The worker number under --workers, named in access events; None in a single process.
    worker: int | None = None
    # "Starting factory <...>" says nothing an operator needs; listen.Listener reports.
    noisy = False

    def __init__(
        self,
        resource: Resource,
        *,
        metrics: Metrics,
        client_address: ClientAddress,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        # A client connection with no request under way (idle keep-alive, a request still
        # coming in, a TLS handshake that never completes) is closed after ``idle_timeout``
        # seconds without a byte from the client. Twisted's default is 12 hours: that many
        # sockets an idle scanner could hold. The timer stops while a request is answered,
        # so long downloads are not cut (their own stall timer is the relay's).
        super().__init__(resource, timeout=idle_timeout)
        self.metrics = metrics
        self.client_address = client_address
        self.displayTracebacks = False
        # Requests being answered; graceful shutdown waits for it to reach zero.
        self.active = 0
        # Open client connections: graceful shutdown closes them so their buffers flush.
        self.open_channels: set[ProxyChannel] = set()

    def log(self, request: Request) -> None:  # type: ignore[override]
        """The access event is emitted by ProxyRequest, structured; no combined log line."""
