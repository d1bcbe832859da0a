"""regproxy's own ``IAgent``: a lean pool of upstream connections.

Twisted's ``Agent`` + ``HTTPConnectionPool`` pay, on every request over a pooled connection,
for work a proxy talking to a handful of origins does not need: a Deferred for the pooled
connection, a retrying wrapper object, a ``callLater`` to expire the connection when it is
put back and its ``cancel`` when it is taken again (two heap operations in the reactor), the
Host value recomputed, the endpoint looked up through the factory. This agent keeps what
matters and does the rest once per origin:

- the wire protocol is :class:`regproxy.upstream._connection.ClientConnection` (llhttp parsing,
  chunked and fixed-length bodies, HEAD, 1xx, ``Connection: close``, body transports with
  backpressure, cancellation): this module only decides which connection a request goes on;
- idle connections wait in a list per origin (most recently used first, so the rest age
  out); no timer per connection: one sweep closes those idle too long, and a connection
  found dead or stale when taken is dropped;
- one request per connection at a time (no pipelining): a connection is idle only after
  it called back that its exchange is over and it may be reused;
- a request that fails on a *reused* connection before any response came (the upstream
  closed it while idle: the stale-connection race) is sent once more on a new connection
  when it is idempotent and has no body, as Twisted's pool does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from ._connection import ClientConnection, OutgoingRequest, RequestNotSent

Key = tuple[bytes, bytes, int]  # scheme, host, port

# Methods a server must treat as idempotent (RFC 9110 9.2.2) that regproxy may resend.
RETRYABLE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})


def should_retry(method: bytes, error: BaseException, body: IBodyProducer | None) -> bool:
    """Whether a request that failed on a reused connection may go once more on a new one:
    idempotent, without a body, failed before any response, and not cancelled."""
    if method not in RETRYABLE_METHODS or body is not None:
        return False
    if not isinstance(error, (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)):
        return False
    reasons = getattr(error, "reasons", None) or ()
    return not any(reason.check(CancelledError) for reason in reasons)


class _Origin:
    """One upstream origin: its endpoint, Host value and idle connections."""

    __slots__ = ("endpoint", "factory", "host", "idle", "key")

    def __init__(
        self,
        key: Key,
        endpoint: IStreamClientEndpoint,
        host: bytes,
        quiescent: Callable[[ClientConnection, _Origin], None],
    ) -> None:
        self.key = key
        self.endpoint = endpoint
        self.host = host
        # (protocol, time it became idle); the most recently used at the end.
        self.idle: list[tuple[ClientConnection, float]] = []
        self.factory = _ProtocolFactory(lambda connection: quiescent(connection, self))


class _ProtocolFactory(Factory):
    noisy = False  # no "Starting factory" line per upstream connection

    def __init__(self, quiescent: Callable[[ClientConnection], None]) -> None:
        self._quiescent = quiescent

    def buildProtocol(self, addr: Any) -> ClientConnection:
        return ClientConnection(self._quiescent)


@functools.lru_cache(maxsize=1024)
def _parsed_uri(uri: bytes) -> URI:
    """``URI.fromBytes``, once per URL asked for again (the agent only reads the result)."""
    parsed: URI = URI.fromBytes(uri)
    return parsed


def host_value(uri: URI) -> bytes:
    """The Host header for ``uri``: the port only when it is not the scheme's default."""
    host: bytes = uri.host
    if b":" in host:  # an IPv6 literal
        host = b"[" + host + b"]"
    if (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443)):
        return host
    return b"%b:%d" % (host, uri.port)


@implementer(IAgent)
class PooledAgent:
    """An ``IAgent`` over :class:`ClientConnection` with a pool of its own; see the module."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        endpoints: IAgentEndpointFactory,
        *,
        max_idle_per_origin: int = 64,
        idle_timeout: float = 120.0,
        max_origins: int = 256,
    ) -> None:
        self._clock = reactor
        self._endpoints = endpoints
        self.max_idle_per_origin = max_idle_per_origin
        self.idle_timeout = idle_timeout
        self._max_origins = max_origins
        self._origins: dict[Key, _Origin] = {}
        self._sweeper: LoopingCall | None = None

    # -- IAgent ----------------------------------------------------------------------------

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        try:
            parsed = _parsed_uri(uri)
            origin = self._origin(parsed)
            headers = Headers() if headers is None else headers.copy()
            if not headers.hasHeader(b"host"):
                headers.setRawHeaders(b"host", [origin.host])
            request = OutgoingRequest(method, parsed.originForm, headers, bodyProducer, uri)
        except Exception:
            return fail()
        connection = self._take_idle(origin)
        if connection is None:
            return self._connect(origin).addCallback(self._send, request)
        return self._send(connection, request, origin)

    # -- the pool --------------------------------------------------------------------------

    def _origin(self, uri: URI) -> _Origin:
        key = (uri.scheme, uri.host, uri.port)
        origin = self._origins.get(key)
        if origin is None:
            endpoint = self._endpoints.endpointForURI(uri)
            if len(self._origins) >= self._max_origins:
                self._forget_idle_origins()
            origin = _Origin(key, endpoint, host_value(uri), self._quiescent)
            self._origins[key] = origin
        return origin

    def _take_idle(self, origin: _Origin) -> ClientConnection | None:
        idle = origin.idle
        oldest_usable = self._clock.seconds() - self.idle_timeout
        while idle:
            connection, since = idle.pop()
            if connection.state == "QUIESCENT" and since >= oldest_usable:
                return connection
            self._close(connection)
        return None

    def _connect(self, origin: _Origin) -> Deferred[ClientConnection]:
        connecting: Deferred[Any] = origin.endpoint.connect(origin.factory)
        return connecting

    def _send(
        self,
        connection: ClientConnection,
        request: OutgoingRequest,
        reused_from: _Origin | None = None,
    ) -> Deferred[IResponse]:
        sending: Deferred[IResponse] = connection.request(request)
        if reused_from is None:
            return sending
        origin = reused_from

        def retry_on_a_new_connection(failure: Failure) -> Any:
            error = failure.value
            if error is not None and should_retry(request.method, error, request.bodyProducer):
                return self._connect(origin).addCallback(self._send, request)
            return failure

        return sending.addErrback(retry_on_a_new_connection)

    def _quiescent(self, connection: ClientConnection, origin: _Origin) -> None:
        """The protocol finished a response and may take another request: idle it."""
        if self._origins.get(origin.key) is not origin or (
            len(origin.idle) >= self.max_idle_per_origin
        ):
            self._close(connection)
            return
        origin.idle.append((connection, self._clock.seconds()))
        if self._sweeper is None:
            self._sweeper = LoopingCall(self._sweep)
            self._sweeper.clock = self._clock
            self._sweeper.start(max(self.idle_timeout / 2, 1.0), now=False)

    def _sweep(self) -> None:
        """Close connections idle longer than the timeout (oldest are first in each list)."""
        oldest_usable = self._clock.seconds() - self.idle_timeout
        for origin in self._origins.values():
            idle = origin.idle
            stale = 0
            while stale < len(idle) and (
                idle[stale][1] < oldest_usable or idle[stale][0].state != "QUIESCENT"
            ):
                stale += 1
            for connection, _ in idle[:stale]:
                self._close(connection)
            del idle[:stale]

    def _forget_idle_origins(self) -> None:
        for key, origin in list(self._origins.items()):
            for connection, _ in origin.idle:
                self._close(connection)
            origin.idle.clear()
            del self._origins[key]

    def _close(self, connection: ClientConnection) -> None:
        if connection.state not in ("CONNECTION_LOST", "ABORTED"):
            connection.transport.loseConnection()  # type: ignore[union-attr]

    def idle_count(self) -> int:
        """Connections waiting for a request (for tests and metrics)."""
        return sum(len(origin.idle) for origin in self._origins.values())

    def closeCachedConnections(self) -> Deferred[None]:
        """Close every idle connection (on shutdown); fires once they are closed."""
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None
        closing = []
        for origin in self._origins.values():
            for connection, _ in origin.idle:
                closing.append(connection.abort())
            origin.idle.clear()
        return gatherResults(closing).addCallback(lambda _: None)


class UpstreamPool:
    """The settings every agent's pool shares, and shutdown for all of them.

    Each :class:`PooledAgent` (one per TLS trust, one per follow-mode upstream) keeps its
    own connections, so a connection verified against one trust never serves another.
    """

    def __init__(
        self, reactor: IReactorTime, *, max_idle_per_origin: int = 64, idle_timeout: float = 120.0
    ) -> None:
        self._reactor = reactor
        self.max_idle_per_origin = max_idle_per_origin
        self.idle_timeout = idle_timeout
        self._agents: list[PooledAgent] = []

    def agent(self, endpoints: IAgentEndpointFactory) -> PooledAgent:
        agent = PooledAgent(
            self._reactor,
            endpoints,
            max_idle_per_origin=self.max_idle_per_origin,
            idle_timeout=self.idle_timeout,
        )
        self._agents.append(agent)
        return agent

    def closeCachedConnections(self) -> Deferred[None]:
        """Close every agent's idle connections; fires once they are closed."""
        closing = [agent.closeCachedConnections() for agent in self._agents]
        return gatherResults(closing).addCallback(lambda _: None)
