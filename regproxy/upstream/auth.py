"""The proxy answering the upstream's challenges with its own credentials.

With credentials configured, clients pull anonymously: the proxy fetches upstream tokens
for the prefixed pull scope, caches them per scope until shortly before expiry (requests
that need the same token share one fetch), and retries once. Credentials go only to the
route's registry and the token realm its challenge names, never to a client or a
redirect target.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

import attrs
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from ..config import Route
from ..protocol import challenge
from ..protocol.errors import OCIError
from ..protocol.headers import user_agent
from .client import UpstreamClient, UpstreamFailure
from .credentials import AnonymousTokens, CredentialSource
from .realm import credential_may_go_to
from .singleflight import SingleFlight

# Tokens are dropped this long before they expire (or at half-life for short ones).
TOKEN_EXPIRY_MARGIN = 30.0
# The Docker token spec: without expires_in a token lasts 60 seconds.
DEFAULT_TOKEN_LIFETIME = 60.0
MAX_TOKEN_RESPONSE = 1024 * 1024
MAX_CACHED_TOKENS = 10_000


def _lifetime(expires_in: object) -> float:
    """The token's lifetime; a missing or unusable ``expires_in`` means the spec's default."""
    try:
        lifetime = float(expires_in)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return DEFAULT_TOKEN_LIFETIME
    return lifetime if 0 < lifetime < float("inf") else DEFAULT_TOKEN_LIFETIME


class CredentialsRejected(OCIError):
    pass


@attrs.frozen
class _Token:
    header: bytes
    expires: float


class UpstreamAuth:
    log = Logger()

    def __init__(
        self,
        *,
        upstream: UpstreamClient,
        sources: dict[str, CredentialSource],
        on_fetch: Callable[[str, str], None] = lambda route, outcome: None,
    ) -> None:
        self._upstream = upstream
        self._clock = upstream.clock
        self._sources = sources
        self._on_fetch = on_fetch
        # (route, realm host) pairs already logged as refused, so the log says it once.
        self._refused_realms: set[tuple[str, str]] = set()
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._fetching: SingleFlight[tuple[str, str], bytes] = SingleFlight()
        # Routes whose registry asked for Basic: send it up front from then on.
        self._basic_routes: set[str] = set()

    def configured(self, route: Route) -> bool:
        return route.name in self._sources

    async def authorization(self, route: Route, scope: str) -> bytes | None:
        """What to send on the first try: a cached token, Basic, or a static header."""
        source = self._sources.get(route.name)
        if source is None:
            return None
        token = self._tokens.get((route.name, scope))
        if token is not None and token.expires > self._clock.seconds():
            return token.header
        if route.name in self._basic_routes or route.credentials.auth_header:
            return await self._credential(route, source)
        return None

    def plan(self, route: Route, values: list[bytes]) -> challenge.Challenge | None:
        """The challenge the proxy will answer with its own credentials, or None.

        None when the route holds no credentials, or when the only Bearer realm offered is
        on a host the credentials do not belong to: then the request goes on as if the
        proxy had none (the client sees the challenge), and the refusal is logged once.
        """
        if route.name not in self._sources:
            return None
        challenges = challenge.parse_all([v.decode("latin-1") for v in values])
        for item in challenges:
            realm = item.get("realm")
            if item.is_bearer and realm:
                if credential_may_go_to(route, realm):
                    return item
                self._refuse_realm(route, realm)
        for item in challenges:
            if item.scheme.lower() == "basic" and not self._anonymous(route):
                return item
        return None

    def _anonymous(self, route: Route) -> bool:
        return isinstance(self._sources.get(route.name), AnonymousTokens)

    def _refuse_realm(self, route: Route, realm: str) -> None:
        host = urlsplit(realm).hostname or "?"
        if (route.name, host) in self._refused_realms:
            return
        self._refused_realms.add((route.name, host))
        self.log.warn(
            "route {route}: not sending the proxy's {source} to the token realm on {host}:"
            " it is not a host those credentials belong to; such requests go on without them",
            route=route.name,
            source=self._sources[route.name].description,
            host=host[:200],
        )

    async def answer(self, route: Route, scope: str, item: challenge.Challenge) -> bytes:
        """The Authorization to retry with, for a challenge :meth:`plan` chose."""
        source = self._sources[route.name]
        if not item.is_bearer:
            self._basic_routes.add(route.name)
            return await self._credential(route, source)
        key = (route.name, scope)
        self._tokens.pop(key, None)
        return await self._fetching.run(key, lambda: self._fetch(route, source, item, scope))

    async def _credential(self, route: Route, source: CredentialSource) -> bytes:
        """The source's Authorization value; a source that fails (a Google token refresh
        that cannot reach its endpoint, a revoked key) is a 502, not a crash."""
        try:
            return await source.authorization()
        except Exception as error:
            self.log.warn(
                "route {route}: the proxy's {source} failed: {error}",
                route=route.name,
                source=source.description,
                error=type(error).__name__,
            )
            self._on_fetch(route.name, "credential_error")
            raise OCIError(
                "UPSTREAM_UNAVAILABLE",
                "the proxy's upstream credentials could not be obtained",
                {"route": route.name},
            ) from None

    async def _fetch(
        self, route: Route, source: CredentialSource, item: challenge.Challenge, scope: str
    ) -> bytes:
        realm = item.get("realm") or ""
        params = []
        service = item.get("service")
        if service:
            params.append(("service", service))
        if scope:
            params.append(("scope", scope))
        url = realm + (("&" if "?" in realm else "?") + urlencode(params) if params else "")
        headers = Headers({b"user-agent": [user_agent(b"-")]})
        credential = await self._credential(route, source)
        if credential:  # none for AnonymousTokens
            headers.setRawHeaders(b"authorization", [credential])
        try:
            response, body = await self._upstream.fetch(
                "GET", url, headers=headers, route=route.name, limit=MAX_TOKEN_RESPONSE
            )
        except (UpstreamFailure, OCIError):
            self._on_fetch(route.name, "unreachable")
            raise OCIError(
                "UPSTREAM_UNAVAILABLE", "the upstream token service cannot be reached"
            ) from None
        if response.code in (401, 403):
            self._on_fetch(route.name, "rejected")
            self.log.warn(
                "route {route}: the upstream token service rejected the proxy's {source}"
                " (HTTP {status})",
                route=route.name,
                source=source.description,
                status=response.code,
            )
            raise CredentialsRejected(
                "UNAUTHORIZED",
                "the upstream registry rejected the proxy's credentials",
                {"route": route.name},
                status=403,
            )
        token: object = None
        lifetime = DEFAULT_TOKEN_LIFETIME
        try:
            document = json.loads(body) if response.code == 200 else None
            if isinstance(document, dict):
                token = document.get("token") or document.get("access_token")
                lifetime = _lifetime(document.get("expires_in"))
        except ValueError:
            token = None
        if not isinstance(token, str) or not token:
            self._on_fetch(route.name, "failed")
            raise OCIError(
                "UPSTREAM_UNAVAILABLE",
                "the upstream token service gave no token",
                {"status": response.code},
            )
        self._on_fetch(route.name, "ok")
        margin = min(TOKEN_EXPIRY_MARGIN, lifetime / 2)
        header = b"Bearer " + token.encode("ascii", "replace")
        now = self._clock.seconds()
        if len(self._tokens) >= MAX_CACHED_TOKENS:
            # One entry per repository clients asked for: drop the dead ones, or all.
            self._tokens = {k: t for k, t in self._tokens.items() if t.expires > now}
            if len(self._tokens) >= MAX_CACHED_TOKENS:
                self._tokens.clear()
        self._tokens[(route.name, scope)] = _Token(header, now + lifetime - margin)
        return header
