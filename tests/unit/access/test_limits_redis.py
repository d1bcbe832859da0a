"""Counts in Redis, in memory: the script per take, the time bound, falling back and back,
logged once each way, reconnecting with back-off; the RESP codec; the address."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import Logger, LogLevel, formatEvent

from regproxy.access import _redis
from regproxy.access._counts import MemoryCounts, Slot
from regproxy.access._fallback import FallbackCounts
from regproxy.access._redis import (
    EXPIRY_MARGIN,
    FIRST_DELAY,
    KEY_PREFIX,
    MAX_DELAY,
    SCRIPT,
    TIMEOUT,
    RedisAddress,
    RedisCounts,
)
from regproxy.access._resp import (
    RedisError,
    RedisProtocolError,
    RedisUnavailable,
    RESPProtocol,
    encode,
    parse,
)
from regproxy.access.limits import Verdict, WindowLimiter
from regproxy.config import RateLimit

from .limits_fakes import FakeEndpoint, FakeRedis, FakeRedisTransport

LIMIT = RateLimit.parse("3/1m")
KEY = "principal:alice"
# One second into KEY's window: a test that waits a little stays in it.
NOW = Slot.of(KEY, 60, 1_700_000_000.0).start / 1000 + 1


class Setup:
    """Two replicas' limiters on one fake Redis, each falling back to its own memory."""

    def __init__(self, address: str = "redis://127.0.0.1:6379/0", *, stall: bool = False):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.server = FakeRedis(self.clock, password=b"s3cret")
        # Each replica's log.
        self.events: list[list[dict[str, Any]]] = [[], []]
        self.endpoints: list[FakeEndpoint] = []
        self.redis: list[RedisCounts] = []
        self.limiters = [self.limiter(address, stall) for _ in range(2)]

    def limiter(self, address: str, stall: bool) -> WindowLimiter:
        which = len(self.redis)
        endpoint = FakeEndpoint(self.server)
        endpoint.stall = stall
        redis = RedisCounts(RedisAddress.parse(address), endpoint, self.clock)
        counts = FallbackCounts(redis, MemoryCounts(), what="Redis", instead="per process")
        counts.log = Logger(observer=self.events[which].append)
        self.endpoints.append(endpoint)
        self.redis.append(redis)
        return WindowLimiter(counts, self.clock)

    def take(self, which: int = 0, key: str = KEY) -> Deferred[Verdict]:
        return self.limiters[which].take(key, LIMIT)

    def messages(self, which: int = 0) -> list[tuple[LogLevel, str]]:
        return [(event["log_level"], formatEvent(event)) for event in self.events[which]]


def now(deferred: Deferred[Verdict]) -> Verdict:
    answers: list[Verdict] = []
    deferred.addCallback(answers.append)
    assert answers, "the take did not answer at once"
    return answers[0]


def test_replicas_count_together_in_redis() -> None:
    setup = Setup()
    remaining = [now(setup.take(i % 2)).remaining for i in range(3)]
    assert remaining == [2, 1, 0]
    refused = now(setup.take(1))
    assert not refused.allowed
    slot = Slot.of(KEY, 60, NOW)
    assert refused.retry_after == pytest.approx(slot.end / 1000 - NOW)
    assert setup.server.count(KEY_PREFIX + slot.name.encode()) == 4
    assert setup.events == [[], []]


def test_one_script_per_take_with_an_expiry_past_the_windows_end() -> None:
    setup = Setup()
    probes = len(setup.server.commands)
    now(setup.take())
    slot = Slot.of(KEY, 60, NOW)
    expiry = slot.end - int(NOW * 1000) + EXPIRY_MARGIN
    assert setup.server.commands[probes:] == [
        [b"EVAL", SCRIPT, b"1", KEY_PREFIX + slot.name.encode(), b"%d" % expiry]
    ]
    # The key outlives its window: the next window counts afresh, not on a leftover.
    setup.clock.advance(slot.end / 1000 - NOW)
    assert now(setup.take()).remaining == 2


def test_a_connection_is_up_only_once_the_script_has_answered() -> None:
    setup = Setup()
    first = setup.server.commands[0]
    assert first[:3] == [b"EVAL", SCRIPT, b"1"] and first[3] == KEY_PREFIX + b"1:0:#probe"
    assert all(redis.connected for redis in setup.redis)


def test_password_and_database_are_sent_and_never_printed() -> None:
    setup = Setup("redis://ops:s3cret@127.0.0.1:6380/3")
    assert setup.server.commands[:2] == [[b"AUTH", b"ops", b"s3cret"], [b"SELECT", b"3"]]
    now(setup.take())
    assert setup.server.count(KEY_PREFIX + Slot.of(KEY, 60, NOW).name.encode(), db=3) == 1
    address = RedisAddress.parse("redis://ops:s3cret@127.0.0.1:6380/3")
    assert "s3cret" not in str(address) + repr(address)
    assert str(address) == "redis://127.0.0.1:6380/3"


def test_a_wrong_password_falls_back_and_says_so_without_the_password() -> None:
    setup = Setup("redis://:wrong-one@127.0.0.1/0")
    assert not setup.redis[0].connected
    assert now(setup.take()).remaining == 2
    [(level, message)] = setup.messages()
    assert level is LogLevel.warn
    assert "WRONGPASS" in message and "wrong-one" not in message


def test_takes_wait_for_the_first_connection() -> None:
    setup = Setup(stall=True)
    pending = setup.take()
    assert not pending.called
    protocol = RESPProtocol(setup.clock, TIMEOUT)
    transport = FakeRedisTransport(setup.server)
    transport.protocol = protocol
    protocol.makeConnection(transport)
    setup.endpoints[0].stalled[0].callback(protocol)
    assert now(pending).remaining == 2
    assert setup.server.count(KEY_PREFIX + Slot.of(KEY, 60, NOW).name.encode()) == 1


def test_a_first_connection_that_never_comes_costs_one_timeout_then_none() -> None:
    setup = Setup(stall=True)
    pending = setup.take()
    setup.clock.advance(TIMEOUT - 0.001)
    assert not pending.called
    setup.clock.advance(0.001)
    assert now(pending).remaining == 2  # counted in memory
    assert [level for level, _ in setup.messages()] == [LogLevel.warn]
    setup.clock.advance(_redis.CONNECT_TIMEOUT)  # the attempt gives up
    assert now(setup.take()).remaining == 1  # at once, in memory
    assert len(setup.messages()) == 1


def test_redis_going_away_falls_back_logs_once_and_once_again_when_back() -> None:
    setup = Setup()
    now(setup.take())
    setup.server.stop()
    assert [now(setup.take()).remaining for _ in range(3)] == [2, 1, 0]  # this replica alone
    assert now(setup.take(1)).remaining == 2  # the other one alone
    assert setup.messages()[0][0] is LogLevel.warn
    assert "connection lost" in setup.messages()[0][1]
    assert len(setup.messages()) == len(setup.messages(1)) == 1
    setup.server.up = True
    setup.clock.advance(FIRST_DELAY)
    assert all(redis.connected for redis in setup.redis)
    assert now(setup.take()).remaining == 1  # counted in Redis again: 1 before the outage
    assert setup.messages()[1] == (LogLevel.info, "rate limits: Redis works again; counting there")
    now(setup.take())
    assert len(setup.messages()) == 2


def test_a_hung_redis_holds_one_take_for_the_timeout_and_the_others_not_at_all() -> None:
    setup = Setup()
    setup.server.hung = True
    pending = setup.take()
    setup.clock.advance(TIMEOUT - 0.001)
    assert not pending.called
    setup.clock.advance(0.001)
    assert now(pending).allowed
    assert not setup.redis[0].connected  # dropped: a late reply would answer the next command
    assert "no answer within 0.25 s" in setup.messages()[0][1]
    now(setup.take())  # at once
    # Reconnecting finds a server that accepts and never answers: still down, not "back".
    setup.clock.advance(FIRST_DELAY + _redis.CONNECT_TIMEOUT)
    assert not setup.redis[0].connected
    assert len(setup.messages()) == 1


def test_a_read_only_redis_is_not_taken_for_a_recovery() -> None:
    setup = Setup()
    setup.server.readonly = True
    assert now(setup.take()).remaining == 2
    [(_, message)] = setup.messages()
    assert "READONLY" in message
    # Its connection is fine, so it stays; the next take tries it (and falls back) again.
    assert now(setup.take()).remaining == 1
    assert len(setup.messages()) == 1


def test_reconnection_backs_off_doubling_to_a_ceiling_and_resets_once_up() -> None:
    setup = Setup()
    setup.server.stop()
    endpoint = setup.endpoints[0]
    for _ in range(160):
        setup.clock.advance(FIRST_DELAY)
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(endpoint.attempts[1:])]
    assert gaps[:5] == [1.0, 2.0, 4.0, 8.0, 10.0] and set(gaps[5:]) == {10.0}
    assert endpoint.attempts[1] - NOW == FIRST_DELAY  # the first retry comes soon
    setup.server.up = True
    setup.clock.advance(MAX_DELAY)
    assert setup.redis[0].connected
    setup.server.stop()
    before = len(endpoint.attempts)
    setup.clock.advance(FIRST_DELAY)
    assert len(endpoint.attempts) == before + 1


def test_closing_ends_the_connection_and_every_timer() -> None:
    setup = Setup()
    closed: list[object] = []
    for redis in setup.redis:
        redis.close().addCallback(closed.append)
    assert closed == [None, None]
    assert not any(redis.connected for redis in setup.redis)
    assert setup.clock.getDelayedCalls() == []


def test_closing_while_down_cancels_the_retry() -> None:
    setup = Setup()
    setup.server.stop()
    assert setup.clock.getDelayedCalls()
    for redis in setup.redis:
        redis.close()
    assert setup.clock.getDelayedCalls() == []


# -- the address ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://127.0.0.1", RedisAddress("127.0.0.1")),
        ("redis://redis.internal:6380/2", RedisAddress("redis.internal", 6380, 2)),
        ("redis://[::1]:7000/", RedisAddress("::1", 7000)),
        ("redis://:p%40ss@h/1", RedisAddress("h", 6379, 1, None, "p@ss")),
        ("redis://u:p@h", RedisAddress("h", 6379, 0, "u", "p")),
    ],
)
def test_redis_addresses(url: str, address: RedisAddress) -> None:
    assert RedisAddress.parse(url) == address


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("rediss://h", "only redis://"),
        ("127.0.0.1:6379", "only redis://"),
        ("redis:///0", "no host"),
        ("redis://h/zero", "only a database number"),
        ("redis://h/0?timeout=1", "only a database number"),
        ("redis://h:99999", "redis: Port out of range"),
    ],
)
def test_bad_redis_addresses(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        RedisAddress.parse(url)


# -- RESP -----------------------------------------------------------------------------------


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert encode(b"INCR", b"a\r\nb") == b"*2\r\n$4\r\nINCR\r\n$4\r\na\r\nb\r\n"


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b":42\r\n", 42),
        (b":-1\r\n", -1),
        (b"+OK\r\n", "OK"),
        (b"$5\r\nhe\r\nl\r\n", b"he\r\nl"),
        (b"$-1\r\n", None),
        (b"*2\r\n:1\r\n*1\r\n$1\r\nx\r\n", [1, [b"x"]]),
        (b"*-1\r\n", None),
    ],
)
def test_replies(data: bytes, reply: object) -> None:
    assert parse(data + b"tail") == (reply, len(data))
    for cut in range(len(data)):
        assert parse(data[:cut]) is None  # incomplete until the last byte


def test_an_error_reply_is_an_error_for_its_command_only() -> None:
    protocol, transport = connected()
    first, second = protocol.call(b"X"), protocol.call(b"PING")
    protocol.dataReceived(b"-ERR no\r\n+PONG\r\n")
    failures: list[Any] = []
    first.addErrback(failures.append)
    assert isinstance(failures[0].value, RedisError) and str(failures[0].value) == "ERR no"
    assert now(second) == "PONG"  # type: ignore[comparison-overlap]
    assert transport.connected


@pytest.mark.parametrize(
    "data", [b"?x\r\n", b":twelve\r\n", b"$99999999\r\n", b":1\r\n:2\r\n", b"+" * (2 << 20)]
)
def test_what_is_not_a_reply_drops_the_connection(data: bytes) -> None:
    protocol, transport = connected()
    answer = protocol.call(b"PING")
    answer.addErrback(lambda _: None)  # answered or failed, whichever came first
    protocol.dataReceived(data)
    assert not transport.connected and protocol.lost.called
    assert protocol.why.startswith("not a Redis reply")


def test_a_lost_connection_fails_every_pending_command() -> None:
    protocol, transport = connected()
    answers = [protocol.call(b"PING") for _ in range(3)]
    transport.loseConnection()
    failures: list[Any] = []
    for answer in answers:
        answer.addErrback(failures.append)
    assert len(failures) == 3
    assert protocol.why.startswith("connection lost")


def test_bad_replies_raise_protocol_errors() -> None:
    with pytest.raises(RedisProtocolError):
        parse(b"!3\r\nabc\r\n")


def connected(clock: Clock | None = None) -> tuple[RESPProtocol, Any]:
    protocol = RESPProtocol(clock or Clock(), TIMEOUT)
    transport = StringTransportWithDisconnection()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


def test_each_command_has_the_timeout_from_when_it_was_sent_with_one_timer() -> None:
    clock = Clock()
    protocol, transport = connected(clock)
    first = protocol.call(b"PING")
    clock.advance(0.2)
    second = [protocol.call(b"PING") for _ in range(100)][-1]
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.04)
    protocol.dataReceived(b"+PONG\r\n" * 100)  # the first 100 answered in time
    assert now(first) == "PONG"  # type: ignore[comparison-overlap]
    clock.advance(TIMEOUT - 0.04 - 0.001)  # 0.449: the last one sent 0.249 ago
    assert transport.connected and not second.called
    clock.advance(0.001)
    assert not transport.connected
    failures: list[Any] = []
    second.addErrback(failures.append)
    assert isinstance(failures[0].value, RedisUnavailable)
    assert str(failures[0].value) == f"no answer within {TIMEOUT} s"
    late: list[Any] = []
    protocol.call(b"PING").addErrback(late.append)  # fails at once
    assert isinstance(late[0].value, RedisUnavailable)
    assert clock.getDelayedCalls() == []


def test_a_busy_connection_answering_in_time_is_kept() -> None:
    clock = Clock()
    protocol, transport = connected(clock)
    for _ in range(40):
        protocol.call(b"PING")
        clock.advance(TIMEOUT * 0.9)
        protocol.dataReceived(b"+PONG\r\n")
    assert transport.connected
    clock.advance(10)
    assert transport.connected  # nothing pending, nothing to time out


def test_an_answer_that_came_while_the_reactor_was_busy_is_read_before_giving_up() -> None:
    clock = Clock()
    protocol, transport = connected(clock)
    answer = protocol.call(b"PING")
    # The reactor is busy for a second; the reply is read at its first look at the socket,
    # which comes before the timers it schedules meanwhile (here: queued first at 1.0).
    clock.callLater(1.0, protocol.dataReceived, b"+PONG\r\n")
    clock.advance(1.0)
    assert transport.connected
    assert now(answer) == "PONG"  # type: ignore[comparison-overlap]
