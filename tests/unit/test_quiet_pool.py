"""The one private Twisted attribute of the upstream pool: fail loudly if Twisted moves it."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import HTTPConnectionPool

from regproxy.upstream.http import make_pool


def test_twisted_still_builds_pool_connections_from_the_private_factory() -> None:
    # If this fails, Twisted changed HTTPConnectionPool: regproxy.upstream.quiet_pool must
    # follow (or the per-connection "Starting factory" log lines come back).
    assert isinstance(HTTPConnectionPool._factory, type)  # type: ignore[attr-defined]


def test_the_pool_regproxy_makes_is_quiet() -> None:
    pool = make_pool(MemoryReactorClock())
    factory = pool._factory  # type: ignore[attr-defined]
    assert factory is not HTTPConnectionPool._factory  # type: ignore[attr-defined]
    assert issubclass(factory, HTTPConnectionPool._factory)  # type: ignore[attr-defined]
    assert factory.noisy is False
