"""What the operator reads when regproxy starts: its version, routes, and doubts.

Listener lines come from ``listen.Listener`` once each address is bound.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence

from twisted.application.service import Service
from twisted.logger import Logger

from twisted import __version__ as twisted_version

from .. import __version__
from ..config import Config, Credentials, Route


class StartupError(Exception):
    """A configuration that cannot run, said in one line that names the option and the fix."""


def credential_kind(credentials: Credentials) -> str:
    """What the proxy authenticates upstream with, never the secret itself."""
    if credentials.auth_header:
        return "static Authorization header"
    if credentials.username:
        return f"basic ({credentials.username})"
    if credentials.google_adc:
        return "Google application default credentials"
    if credentials.google_key_file and credentials.google_json_key:
        return f"Google key file as _json_key ({credentials.google_key_file})"
    if credentials.google_key_file:
        return f"Google key file ({credentials.google_key_file})"
    return "none (clients bring their own)"


def describe_route(route: Route, *, cache: bool) -> str:
    prefix = route.prefix or "(none)"
    return (
        f"route {route.name}: upstream {route.upstream.origin}, prefix {prefix}, "
        f"credentials {credential_kind(route.credentials)}, cache {'on' if cache else 'off'}"
    )


def uses_cache(config: Config, route: Route) -> bool:
    """Whether ``route`` is served through the cache: there is one (``--cache-dir``) and
    the route does not opt out (``cache = false`` in a routes file)."""
    return config.cache is not None and route.cache


def holds_credentials(config: Config) -> bool:
    return any(route.credentials.configured for route in config.routes)


def public_url_warning(config: Config) -> str | None:
    """Without ``--public-url`` a token's audience is the Host its request named, which the
    client chooses: another proxy with the same ``token_key`` would take this one's tokens."""
    if config.auth is None or config.public_url:
        return None
    return (
        "[auth] without --public-url: tokens are for whatever Host a client names, so a proxy "
        "sharing this token_key accepts this one's tokens (and this one theirs); give "
        "--public-url so that its tokens are its own"
    )


class StartupReport(Service):
    """Logs, when the service starts, what regproxy is and what it serves."""

    log = Logger()

    def __init__(self, config: Config, warnings: Sequence[str] = ()) -> None:
        self.config = config
        self.warnings = tuple(warnings)

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "regproxy {version} (Twisted {twisted}, Python {python}) starting",
            version=__version__,
            twisted=twisted_version,
            python=platform.python_version(),
        )
        for route in self.config.routes:
            # "line" is the rendered text; the other fields stay keys of the JSON line.
            self.log.info(
                "{line}",
                line=describe_route(route, cache=uses_cache(self.config, route)),
                route=route.name,
                upstream=route.upstream.origin,
                prefix=route.prefix,
            )
        auth = self.config.auth
        if auth is not None:
            self.log.info(
                "access control: {users} users, {groups} groups, {issuers} OIDC issuers;"
                " clients get their tokens from this proxy (/_token); credentials over plain"
                " HTTP {plain}",
                users=len(auth.users),
                groups=len(auth.groups),
                issuers=len(auth.oidc),
                plain="accepted (--insecure-auth)" if auth.insecure else "refused",
            )
        access = public_url_warning(self.config)
        for warning in (*self.warnings, *([access] if access else [])):
            self.log.warn("{line}", line=warning)
