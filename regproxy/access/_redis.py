"""Counts in Redis, shared by every replica: one atomic script per request, bounded in time.

A Redis that is down, or that accepts the connection and never answers, must not hold up a
request: a take waits at most ``timeout`` seconds for its answer (and, only while the very
first connection is being made, up to ``timeout`` more for it); past that the connection is
dropped and the caller falls back. While there is no connection, takes fail at once (the
caller falls back). Reconnection runs in the background with back-off, and a connection
counts as up only once the very script a take runs has answered on it (a stopped server
still completes TCP handshakes, a read-only replica accepts connections but refuses writes),
so an outage is not mistaken for a recovery.
"""

from __future__ import annotations

from typing import cast
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from ._counts import Slot
from ._resp import RedisError, RedisUnavailable, Reply, RESPProtocol

DEFAULT_PORT = 6379
# Seconds a take waits for Redis's answer (see above for the first connection).
TIMEOUT = 0.25
# Seconds to connect, authenticate and see the script answer.
CONNECT_TIMEOUT = 2.0
FIRST_DELAY = 0.5
MAX_DELAY = 10.0
KEY_PREFIX = b"regproxy:limits:"
# Beyond the window's end, so that a replica whose clock is a little behind still finds it.
EXPIRY_MARGIN = 5000
# INCR, and an expiry when the key has none (the first take of the window), in one step.
SCRIPT = b"""
local n = redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""
PROBE = Slot("#probe", 0, 1)


@attrs.frozen
class RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``; prints without the password."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """The address in ``url``; ValueError with a sentence naming what is wrong."""
        try:
            parts = urlsplit(url)
            port = parts.port or DEFAULT_PORT
        except ValueError as error:
            raise ValueError(f"redis: {error}; write redis://host:port/db") from None
        if parts.scheme != "redis":
            raise ValueError("redis: only redis:// addresses are supported (no TLS: rediss://)")
        if not parts.hostname:
            raise ValueError("redis: the address has no host; write redis://host:port/db")
        path = parts.path.strip("/")
        if parts.query or parts.fragment or not (path == "" or path.isdigit()):
            raise ValueError("redis: after the host, only a database number: redis://host:port/0")
        return cls(
            parts.hostname,
            port,
            int(path or 0),
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password is not None else None,
        )


class RedisCounts:
    """Counters in one Redis, over one pipelined connection kept open and reconnected."""

    def __init__(
        self,
        address: RedisAddress,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        *,
        timeout: float = TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.address = address
        self.endpoint = endpoint
        self.clock = clock
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._protocol: RESPProtocol | None = None
        # Takes waiting for the very first connection (later ones fall back at once).
        self._waiters: list[Deferred[RESPProtocol]] | None = []
        self._attempt: Deferred[RESPProtocol] | None = None
        self._retry: IDelayedCall | None = None
        self._delay = FIRST_DELAY
        self._why = "not connected yet"
        self._closed = False
        self._connect()

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    def increment(self, slot: Slot, now: float) -> Deferred[int]:
        expiry = slot.end - int(now * 1000) + EXPIRY_MARGIN
        if self._protocol is not None:
            return _run_script(self._protocol, slot, expiry)
        if self._waiters is None:
            return fail(RedisUnavailable(self._why))
        waiter: Deferred[RESPProtocol] = Deferred()
        self._waiters.append(waiter)
        waiter.addTimeout(self.timeout, self.clock, onTimeoutCancel=self._not_yet)
        return waiter.addCallback(_run_script, slot, expiry)

    def _not_yet(self, result: object, timeout: float) -> RESPProtocol:
        raise RedisUnavailable(f"not connected within {timeout} s")

    # -- the connection ----------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        factory = Factory.forProtocol(lambda: RESPProtocol(self.clock, self.timeout))
        connecting = self.endpoint.connect(factory)
        attempt = connecting.addCallback(lambda protocol: ensureDeferred(self._prepare(protocol)))
        attempt.addTimeout(self.connect_timeout, self.clock)
        attempt.addCallbacks(self._connected, self._failed)
        self._attempt = attempt

    async def _prepare(self, connected: object) -> RESPProtocol:
        protocol = cast(RESPProtocol, connected)
        try:
            address = self.address
            if address.password is not None:
                user = [address.username.encode()] if address.username else []
                await protocol.call(b"AUTH", *user, address.password.encode())
            if address.db:
                await protocol.call(b"SELECT", b"%d" % address.db)
            await _run_script(protocol, PROBE, 1000)
        except BaseException:
            protocol.abort("the connection could not be prepared")
            raise
        return protocol

    def _connected(self, protocol: RESPProtocol) -> None:
        self._attempt = None
        if self._closed:
            protocol.close()
            return
        self._protocol = protocol
        self._delay = FIRST_DELAY
        protocol.lost.addCallback(self._lost, protocol)
        self._release_waiters(protocol)

    def _failed(self, reason: Failure) -> None:
        self._attempt = None
        self._why = f"cannot connect: {_reason(reason)}"
        self._release_waiters(None)
        self._reconnect()

    def _lost(self, _: None, protocol: RESPProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None
            self._why = protocol.why
            self._reconnect()

    def _reconnect(self) -> None:
        if not self._closed:
            self._retry = self.clock.callLater(self._delay, self._connect)
            self._delay = min(self._delay * 2, MAX_DELAY)

    def _release_waiters(self, protocol: RESPProtocol | None) -> None:
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            if waiter.called:
                continue
            if protocol is None:
                waiter.errback(RedisUnavailable(self._why))
            else:
                waiter.callback(protocol)

    def close(self) -> Deferred[None]:
        self._closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._attempt is not None:
            self._attempt.cancel()
        if self._protocol is None:
            return succeed(None)
        lost = Deferred[None]()
        self._protocol.lost.addCallback(lambda _: lost.callback(None))
        self._protocol.close()
        return lost


def _run_script(protocol: RESPProtocol, slot: Slot, expiry: int) -> Deferred[int]:
    key = KEY_PREFIX + slot.name.encode()
    reply = protocol.call(b"EVAL", SCRIPT, b"1", key, b"%d" % max(1, expiry))
    return reply.addCallback(_count)


def _count(reply: Reply) -> int:
    if not isinstance(reply, int):
        raise RedisError(f"the script answered {type(reply).__name__}, not a number")
    return reply


def _reason(reason: Failure) -> str:
    text = str(reason.value)
    return f"{type(reason.value).__name__}: {text}" if text else type(reason.value).__name__
