"""The one private Twisted API regproxy touches, isolated here.

``HTTPConnectionPool`` builds its connections with the class in its private ``_factory``
attribute, whose ``noisy`` flag makes Twisted log a "Starting factory" / "Stopping factory"
pair for every upstream connection: thousands of useless lines a day for a busy proxy.
Twisted offers no public switch for it. ``tests/unit/test_quiet_pool.py`` fails if Twisted
changes this attribute, so an upgrade cannot silently bring the noise (or an error) back.
"""

from __future__ import annotations

from twisted.web.client import HTTPConnectionPool


def quiet_connection_factory(pool: HTTPConnectionPool) -> None:
    """Make the pool's per-connection factories quiet, if this Twisted still allows it."""
    base = getattr(pool, "_factory", None)
    if not isinstance(base, type):
        return
    quiet: type = type("QuietHTTP11ClientFactory", (base,), {"noisy": False})
    setattr(pool, "_factory", quiet)  # noqa: B010 - a private attribute, on purpose
