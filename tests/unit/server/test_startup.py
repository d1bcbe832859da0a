"""The start-up report: one line per route, saying whether the cache serves it."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger, LogLevel, formatEvent

from regproxy.config import CacheConfig, Config, Route, Upstream
from regproxy.server.startup import StartupReport

UPSTREAM = Upstream("https", "registry.example")
CACHE = CacheConfig(directory="/var/cache/regproxy", max_size=1 << 30)


def route_lines(config: Config) -> list[str]:
    events: list[dict[str, Any]] = []
    report = StartupReport(config)
    report.log = Logger(observer=events.append)
    report.startService()
    return [formatEvent(event) for event in events if "route" in event]


def test_a_cache_directory_turns_the_cache_on_for_every_route() -> None:
    config = Config(routes=(Route(UPSTREAM, name="a"), Route(UPSTREAM, name="b")), cache=CACHE)
    lines = route_lines(config)
    assert len(lines) == 2
    assert all(line.endswith("cache on") for line in lines), lines


def test_without_a_cache_directory_the_cache_is_off() -> None:
    (line,) = route_lines(Config(routes=(Route(UPSTREAM),)))
    assert line.endswith("cache off")


def test_a_route_that_opts_out_of_the_cache_says_so() -> None:
    config = Config(
        routes=(Route(UPSTREAM, name="kept"), Route(UPSTREAM, name="passed", cache=False)),
        cache=CACHE,
    )
    kept, passed = route_lines(config)
    assert kept.startswith("route kept:") and kept.endswith("cache on")
    assert passed.startswith("route passed:") and passed.endswith("cache off")


def report_lines(config: Config) -> list[str]:
    events: list[dict[str, Any]] = []
    report = StartupReport(config)
    report.log = Logger(observer=events.append)
    report.startService()
    return [formatEvent(event) for event in events]


def test_access_control_is_reported_without_a_secret() -> None:
    from regproxy.config import AuthConfig

    auth = AuthConfig(users={"alice": b"$2b$04$secret-hash"}, groups={"ops": ("alice",)})
    lines = report_lines(Config(routes=(Route(UPSTREAM),), auth=auth))
    [line] = [line for line in lines if line.startswith("access control:")]
    assert line.startswith("access control: 1 users, 1 groups, 0 OIDC issuers;")
    assert line.endswith("credentials over plain HTTP refused")
    assert "secret-hash" not in "".join(lines)
    assert not [
        line for line in report_lines(Config(routes=(Route(UPSTREAM),))) if "access" in line
    ]


def warning_lines(config: Config) -> list[str]:
    events: list[dict[str, Any]] = []
    report = StartupReport(config)
    report.log = Logger(observer=events.append)
    report.startService()
    return [formatEvent(event) for event in events if event["log_level"] is LogLevel.warn]


def test_access_control_without_a_public_url_is_warned_about() -> None:
    from regproxy.config import AuthConfig

    auth = AuthConfig(users={"alice": b"$2b$04$secret-hash"})
    [line] = warning_lines(Config(routes=(Route(UPSTREAM),), auth=auth))
    assert line.startswith("[auth] without --public-url:") and "token_key" in line
    fixed = Config(routes=(Route(UPSTREAM),), auth=auth, public_url="https://r.example")
    assert warning_lines(fixed) == []
    assert warning_lines(Config(routes=(Route(UPSTREAM),))) == []
