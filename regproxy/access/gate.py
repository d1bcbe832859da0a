"""The access state of one configuration, and where the web layer gets it.

A :class:`Gate` is built from a route table's ``[auth]`` and ``[limits]`` (the users, the
groups, the token key, the compiled rules) and replaced whole when a reload brings a new
table: a request uses the gate of the routing snapshot it took, so users, groups and rules
change together with the routes. What outlives a configuration (rate counts, the login
throttle, OIDC key caches, a token key made at start-up) lives in :class:`Gates`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed

from ..config import AuthConfig, LimitsConfig, OIDCConfig, RateLimit, Route
from ..routing.matching import RouteTable
from ._throttle import client_key
from .rules import ANONYMOUS, RouteRules, memberships
from .tokens import TokenKey, Verifier
from .users import RunBlocking, Users


class IdentityIssuer(Protocol):
    """An OIDC issuer (``regproxy.access.oidc.OIDCVerifier``): a JWT in, the configured
    claim's value out; it raises when the token is refused."""

    async def verify(self, token: str) -> str: ...


class Verdict(Protocol):
    """A rate limiter's answer (``regproxy.access.limits.Verdict``)."""

    @property
    def allowed(self) -> bool: ...

    def headers(self) -> list[tuple[bytes, bytes]]: ...


class RateLimiter(Protocol):
    """``regproxy.access.limits.RateLimiter``; its Deferred fires with a :class:`Verdict`
    (typed Any here: Deferred is invariant, and the limiter's Verdict is its own class)."""

    def take(self, key: str, limit: RateLimit) -> Deferred[Any]: ...


class LoginThrottle(Protocol):
    """Failed logins per client address (``regproxy.access.limits.LoginThrottle``):
    ``attempt`` before checking a password, then ``failed`` or ``succeeded``, always."""

    def attempt(self, address: str) -> Deferred[bool]: ...

    def retry_after(self, address: str) -> int: ...

    def failed(self, address: str) -> None: ...

    def succeeded(self, address: str) -> None: ...


class NoThrottle:
    def attempt(self, address: str) -> Deferred[bool]:
        return succeed(True)

    def retry_after(self, address: str) -> int:
        return 1

    def failed(self, address: str) -> None:
        pass

    def succeeded(self, address: str) -> None:
        pass


@attrs.frozen
class Client:
    """Who is on the other end, as the web layer found out."""

    # As seen through trusted proxies.
    address: str
    # Whether credentials may travel here: TLS, a trusted proxy that says https, loopback.
    secure: bool


MAX_DECISIONS = 10_000
# How authentications ended, for /metrics: ok, failed, throttled, plain_http, invalid_token.
CountAuthentication = Callable[[str], None]


class Gate:
    """Users, groups, rules and the token key of one configuration."""

    def __init__(
        self,
        table: RouteTable,
        *,
        key: TokenKey,
        users: Users,
        issuers: Mapping[str, IdentityIssuer],
        clock: Callable[[], float],
        throttle: LoginThrottle,
        limiter: RateLimiter | None,
        count: CountAuthentication,
        insecure: bool = False,
    ) -> None:
        self.table = table
        self.auth: AuthConfig | None = table.auth
        self.limits: LimitsConfig | None = table.limits
        self.key = key
        self.users = users
        self.issuers = issuers
        self.clock = clock
        self.throttle = throttle
        self.limiter = limiter if self.limits is not None else None
        self.count = count
        self.insecure = insecure or (self.auth is not None and self.auth.insecure)
        self.verifier = Verifier(key, clock)
        self.token_ttl = self.auth.token_ttl if self.auth is not None else 300.0
        self._groups = memberships(self.auth.groups) if self.auth is not None else {}
        self._rules = {route.name: (route, RouteRules.of(route)) for route in table.routes}
        self._decisions: dict[tuple[str, str, str], bool] = {}
        self._namespaces = tuple(route.namespace for route in table.routes if route.namespace)

    @property
    def authenticates(self) -> bool:
        """Whether the proxy checks who is asking ([auth]); else only limits apply."""
        return self.auth is not None

    def groups(self, principal: str) -> frozenset[str]:
        return self._groups.get(principal, frozenset())

    def known(self, principal: str) -> bool:
        """Whether a principal from a token still exists in this configuration: a user
        removed from the file, or an OIDC issuer removed, ends its tokens."""
        if principal == ANONYMOUS:
            return True
        issuer, colon, _ = principal.partition(":")
        if colon:
            return issuer in self.issuers
        return principal in self.users

    def admits(self, route: Route, principal: str, name: str) -> bool:
        """Whether ``principal`` may pull ``name`` (named within the route) now.

        Decisions are remembered: users, groups and rules do not change within a gate
        (a reload makes a new one), and a manifest GET must cost little.
        """
        key = (route.name, principal, name)
        decided = self._decisions.get(key)
        if decided is not None:
            return decided
        known = self._rules.get(route.name)
        if known is None or known[0] is not route:
            # A route of another snapshot: only its own rules can say, and are not kept.
            return RouteRules.of(route).admits(principal, self.groups(principal), name)
        decided = known[1].admits(principal, self.groups(principal), name)
        if len(self._decisions) >= MAX_DECISIONS:
            self._decisions.clear()
        self._decisions[key] = decided
        return decided

    def may_pull(self, principal: str, host: str, client_name: str) -> bool:
        """At token time: whether some route this client may reach admits the name.

        Token requests carry no ``?ns=``: a name a namespace route admits is granted too;
        every request is checked against its own route's rules anyway.
        """
        for namespace in (None, *self._namespaces):
            match = self.table.match(host, namespace, client_name)
            if (
                match is not None
                and match.allowed
                and match.name
                and self.admits(match.route, principal, match.name)
            ):
                return True
        return False

    def rate(self, principal: str | None, address: str) -> tuple[str, RateLimit] | None:
        """The limiter's key and limit for a manifest GET, or None when not limited."""
        if self.limits is None:
            return None
        if principal:
            limit = self.limits.users
            key = f"principal:{principal}"
        else:
            limit = self.limits.anonymous
            # As the login throttle counts clients: an IPv6 /64 is one (anyone holds one).
            key = f"anonymous:{client_key(address)}"
        return None if limit is None else (key, limit)


class Gates:
    """The gate of each routing snapshot, built on first use; the parts that outlive one."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        run_blocking: RunBlocking,
        issuers_for: Callable[[Sequence[OIDCConfig]], Mapping[str, IdentityIssuer]],
        throttle: LoginThrottle | None = None,
        limiter_for: Callable[[LimitsConfig], RateLimiter] | None = None,
        count: CountAuthentication = lambda result: None,
        insecure: bool = False,
    ) -> None:
        self._clock = clock
        self._run_blocking = run_blocking
        self._issuers_for = issuers_for
        # `is None`, not `or`: an empty LoginThrottle has len() 0, and is falsy.
        self._throttle = throttle if throttle is not None else NoThrottle()
        self._limiter_for = limiter_for
        self._limiters: dict[LimitsConfig, RateLimiter] = {}
        self._count = count
        # --insecure-auth: a command-line choice, kept through reloads of the file.
        self._insecure = insecure
        self._table: RouteTable | None = None
        self._gate: Gate | None = None
        # Without token_key: one key for the process's life, so a reload keeps tokens valid.
        self._own_key: TokenKey | None = None

    def __call__(self, table: RouteTable) -> Gate | None:
        """The gate for ``table``; None without [auth] and [limits] (today's behaviour)."""
        if table is self._table:
            return self._gate
        self._table = table
        self._gate = self.build(table) if table.auth or table.limits else None
        return self._gate

    def build(self, table: RouteTable) -> Gate:
        auth = table.auth
        if auth is not None and auth.token_key_pem is not None:
            key = TokenKey.from_pem(auth.token_key_pem)
        else:
            if self._own_key is None:
                self._own_key = TokenKey.generate()
            key = self._own_key
        limiter = None
        if table.limits is not None and self._limiter_for is not None:
            # Counts survive reloads that keep the same limits.
            if table.limits not in self._limiters:
                self._limiters[table.limits] = self._limiter_for(table.limits)
            limiter = self._limiters[table.limits]
        return Gate(
            table,
            key=key,
            users=Users(auth.users if auth else {}, self._run_blocking),
            issuers=self._issuers_for(auth.oidc if auth else ()),
            clock=self._clock,
            throttle=self._throttle,
            limiter=limiter,
            count=self._count,
            insecure=self._insecure,
        )
