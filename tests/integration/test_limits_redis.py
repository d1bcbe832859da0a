"""Exact limits across replicas through a real Redis, and what happens when it goes away or
hangs: the limiters fall back (to the workers' file when there is one), log it once, never
hold a request up beyond the bound, and log once again when Redis is back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from regproxy.access._counts import Slot
from regproxy.access._redis import EXPIRY_MARGIN, KEY_PREFIX, TIMEOUT
from tests.support.redis import RedisServer
from tests.support.waiting import eventually

from .limits_driver import Driver
from .test_limits_workers import key_with_time_left

PASSWORD = "limits-secret-7"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis", password=PASSWORD) as server:
        yield server


@pytest.fixture
def drivers() -> Iterator[list[Driver]]:
    """Start drivers with ``drivers.append(Driver(...))``; all stopped at teardown."""
    started: list[Driver] = []
    yield started
    for driver in started:
        driver.stop()


def started(drivers: list[Driver], *args: str) -> Driver:
    driver = Driver(*args)
    drivers.append(driver)
    assert driver.logs() == []  # running, connected (the first take would wait for it)
    return driver


def test_two_replicas_on_one_redis_admit_exactly_the_count(
    redis: RedisServer, drivers: list[Driver]
) -> None:
    replicas = [started(drivers, "--redis", redis.url) for _ in range(2)]
    key = key_with_time_left(3600)
    at = time.time() + 0.5
    for replica in replicas:
        replica.send({"take": key, "limit": "250/1h", "n": 300, "at": at})
    answers = [replica.receive() for replica in replicas]
    assert sum(answer["allowed"] for answer in answers) == 250
    assert [answer["logs"] for answer in answers] == [[], []]
    slot = Slot.of(key, 3600, time.time())
    name = (KEY_PREFIX + slot.name.encode()).decode()
    assert redis.cli("GET", name) == "600"
    # The key outlives its window by the margin, and no more (Redis reads its clock once per
    # batch of commands, a little before we did: a second's slack).
    ttl = int(redis.cli("PTTL", name))
    assert (
        slot.end - time.time() * 1000 < ttl <= slot.end - time.time() * 1000 + EXPIRY_MARGIN + 1000
    )
    print(f"s per take, 300 at once per replica: {[a['per_take'] for a in answers]}")


def test_redis_gone_falls_back_logs_once_and_once_more_when_back(
    redis: RedisServer, drivers: list[Driver]
) -> None:
    replica = started(drivers, "--redis", redis.url)
    key = key_with_time_left(3600)
    assert replica.take(key, "5/1h")["remaining"] == [4]
    redis.stop()
    down = replica.take(key, "5/1h", n=5)
    assert down["remaining"] == [4, 3, 2, 1, 0]  # in this process, from nothing
    assert down["slowest"] < 1.0
    [warning] = down["logs"]
    assert warning.startswith("warn: rate limits: Redis at redis://127.0.0.1:")
    assert "counting per process until it is back" in warning
    assert PASSWORD not in warning
    assert replica.take(key, "5/1h")["logs"] == []
    redis.start()

    def back() -> list[str]:
        logs: list[str] = replica.take(key, "5/1h")["logs"]
        return logs

    [recovered] = eventually(back, 20, what="counting in Redis again")
    assert recovered.startswith("info: rate limits: Redis at") and "works again" in recovered
    assert replica.take(key, "5/1h")["logs"] == []
    assert redis.cli("GET", (KEY_PREFIX + Slot.of(key, 3600, time.time()).name.encode()).decode())


def test_a_hung_redis_holds_a_take_no_longer_than_the_bound(
    redis: RedisServer, drivers: list[Driver]
) -> None:
    replica = started(drivers, "--redis", redis.url)
    key = key_with_time_left(3600)
    replica.take(key, "100/1h")
    redis.pause()  # SIGSTOP: connections still complete, nothing answers
    try:
        hung = replica.take(key, "100/1h", n=3)
        assert TIMEOUT <= hung["slowest"] < TIMEOUT + 0.75
        [warning] = hung["logs"]
        assert f"no answer within {TIMEOUT} s" in warning
        # Known to be down now: the next takes do not wait at all.
        assert replica.take(key, "100/1h", n=3)["slowest"] < TIMEOUT
    finally:
        redis.resume()
    [recovered] = eventually(lambda: replica.take(key, "100/1h")["logs"], 20, what="Redis back")
    assert "works again" in recovered


def test_with_redis_gone_the_workers_still_count_together_in_their_file(
    redis: RedisServer, drivers: list[Driver], tmp_path: Path
) -> None:
    args = ("--redis", redis.url, "--shared", str(tmp_path))
    workers = [started(drivers, *args) for _ in range(2)]
    key = key_with_time_left(3600)
    redis.stop()
    answers = [worker.take(key, "4/1h", n=3) for worker in workers]
    assert [answer["remaining"] for answer in answers] == [[3, 2, 1], [0, 0, 0]]
    assert "counting per proxy (across its workers) until it is back" in answers[0]["logs"][0]
