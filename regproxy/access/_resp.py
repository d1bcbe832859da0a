"""The Redis protocol (RESP2), just what counting needs: commands out, replies in order.

Why our own and not a library: redis-py blocks or needs asyncio; txredisapi (on Twisted)
is a whole client with its own connection handling, where counting sends one command (EVAL)
and reads integers, errors and the odd status line, and where the time bound must be ours
(one watchdog per connection, see ``RESPProtocol``).
"""

from __future__ import annotations

import collections
from typing import cast

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

# Replies here are short: a server that sends more is not one we should trust.
MAX_REPLY = 1 << 20

Reply = int | bytes | str | None | list["Reply"]


class RedisError(Exception):
    """An error reply (``-ERR ...``): the command failed, the connection is fine."""


class RedisProtocolError(Exception):
    """Bytes that are not RESP, or more than we asked for: the connection is dropped."""


def encode(*args: bytes) -> bytes:
    """A command as RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def parse(buffer: bytes | bytearray, start: int = 0) -> tuple[Reply | RedisError, int] | None:
    """The reply at ``start`` and where it ends; None while it is incomplete."""
    end = buffer.find(b"\r\n", start)
    if end < 0:
        if len(buffer) - start > MAX_REPLY:
            raise RedisProtocolError("a reply line is too long")
        return None
    kind, line, after = buffer[start : start + 1], bytes(buffer[start + 1 : end]), end + 2
    if kind == b"+":
        return line.decode("utf-8", "replace"), after
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")), after
    try:
        number = int(line)
    except ValueError:
        raise RedisProtocolError(f"not a number after {kind!r}") from None
    if kind == b":":
        return number, after
    if kind == b"$":
        if number < 0:
            return None, after
        if number > MAX_REPLY:
            raise RedisProtocolError("a bulk reply is too long")
        if len(buffer) < after + number + 2:
            return None
        return bytes(buffer[after : after + number]), after + number + 2
    if kind == b"*":
        if number < 0:
            return None, after
        if number > MAX_REPLY:
            raise RedisProtocolError("an array reply is too long")
        items: list[Reply] = []
        for _ in range(number):
            parsed = parse(buffer, after)
            if parsed is None:
                return None
            item, after = parsed
            items.append(str(item) if isinstance(item, RedisError) else item)
        return items, after
    raise RedisProtocolError(f"unknown reply type {kind!r}")


class RedisUnavailable(Exception):
    """No answer from Redis now: the connection is gone (or never was); says why."""


class RESPProtocol(Protocol):
    """Commands pipelined on one connection; each answered by its reply, in order.

    A command not answered within ``timeout`` seconds drops the connection (a late reply
    would answer the next command), failing every pending one: one timer per connection, for
    the oldest command, as replies come in order. ``lost`` fires once the connection has
    ended, ``why`` then says why in a few words.
    """

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        # (when sent, its answer), oldest first.
        self._waiting: collections.deque[tuple[float, Deferred[Reply]]] = collections.deque()
        self._watchdog: IDelayedCall | None = None
        self._overdue: Deferred[Reply] | None = None
        self._buffer = bytearray()
        self.lost: Deferred[None] = Deferred()
        self.why = ""

    def abort(self, why: str) -> None:
        """Drop the connection now, for the reason given."""
        self.why = self.why or why
        self._transport().abortConnection()

    def call(self, *args: bytes) -> Deferred[Reply]:
        if self.why:
            return fail(RedisUnavailable(self.why))
        answer: Deferred[Reply] = Deferred()
        self._waiting.append((self.clock.seconds(), answer))
        if self._watchdog is None:
            self._watchdog = self.clock.callLater(self.timeout, self._check)
        self._transport().write(encode(*args))
        return answer

    def _check(self) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        sent, oldest = self._waiting[0]
        left = sent + self.timeout - self.clock.seconds()
        if left > 0:
            self._watchdog = self.clock.callLater(left, self._check)
        elif self._overdue is not oldest:
            # The reactor runs timers before it reads: when it was busy past the deadline,
            # the answer may be waiting in the socket. Read once more before giving up.
            self._overdue = oldest
            self._watchdog = self.clock.callLater(0, self._check)
        else:
            self.abort(f"no answer within {self.timeout} s")

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        try:
            while self._buffer:
                parsed = parse(self._buffer)
                if parsed is None:
                    return
                reply, end = parsed
                del self._buffer[:end]
                if not self._waiting:
                    raise RedisProtocolError("a reply to no command")
                _, answer = self._waiting.popleft()
                if isinstance(reply, RedisError):
                    answer.errback(reply)
                else:
                    answer.callback(reply)
        except RedisProtocolError as error:
            self._buffer.clear()
            self.abort(f"not a Redis reply: {error}")

    def close(self) -> None:
        """Close the connection once what was written has gone."""
        self._transport().loseConnection()

    def _transport(self) -> ITCPTransport:
        # Every transport this protocol gets (TCP, TLS over TCP, tests' StringTransport)
        # can abort; ``Protocol`` types it as a plain, optional ITransport.
        return cast(ITCPTransport, self.transport)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.why = self.why or f"connection lost: {reason.getErrorMessage()}"
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        waiting, self._waiting = self._waiting, collections.deque()
        for _, answer in waiting:
            answer.errback(RedisUnavailable(self.why))
        self.lost.callback(None)
