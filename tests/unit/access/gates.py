"""Gates for tests: a route table with [auth], bcrypt at the lowest cost, checks run at once."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import bcrypt
from twisted.internet.defer import Deferred, succeed

from regproxy.access.gate import Client, Gate, Gates, IdentityIssuer
from regproxy.config import AccessRule, AuthConfig, LimitsConfig, OIDCConfig, Route, Upstream
from regproxy.routing.matching import RouteTable

PASSWORDS = {"alice": "alice-secret-pw", "bob": "bob-secret-pw", "carol": "carol-secret-pw"}
SERVICE = "proxy.example"
REALM = "http://proxy.example/_token"
SAFE = Client("127.0.0.1", secure=True)
PLAIN = Client("192.0.2.7", secure=False)


def hashes(passwords: Mapping[str, str] = PASSWORDS) -> dict[str, bytes]:
    return {name: bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)) for name, pw in passwords.items()}


HASHES = hashes()


def at_once(work: Callable[[], Any]) -> Deferred[Any]:
    """Runs the 'blocking' call on the spot: the tests need no thread pool."""
    return succeed(work())


RULES = (
    AccessRule(("public/**",), ("anonymous",)),
    AccessRule(("team-a/**",), ("@ops", "alice", "ci:repo:acme/a:*")),
    AccessRule(("secret/**",), ()),
)


def route(**changes: Any) -> Route:
    defaults: dict[str, Any] = {"upstream": Upstream("https", "upstream.example"), "name": "own"}
    defaults["access"] = (*RULES, AccessRule(("**",), ("users",)))
    defaults.update(changes)
    return Route(**defaults)


def auth(**changes: Any) -> AuthConfig:
    defaults: dict[str, Any] = {"users": HASHES, "groups": {"ops": ("bob",)}, "token_ttl": 300.0}
    defaults.update(changes)
    return AuthConfig(**defaults)


class FakeIssuer:
    """An OIDC issuer that knows some JWTs by heart."""

    def __init__(self, subjects: Mapping[str, str]) -> None:
        self.subjects = dict(subjects)

    async def verify(self, token: str) -> str:
        if token not in self.subjects:
            raise ValueError("unknown token")
        return self.subjects[token]


class CountingThrottle:
    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self.failures: dict[str, int] = {}
        self.successes: list[str] = []

    def attempt(self, address: str) -> Deferred[bool]:
        return succeed(self.failures.get(address, 0) < self.limit)

    def retry_after(self, address: str) -> int:
        return 42

    def failed(self, address: str) -> None:
        self.failures[address] = self.failures.get(address, 0) + 1

    def succeeded(self, address: str) -> None:
        self.successes.append(address)


@attrs.define
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make_gates(
    clock: Callable[[], float],
    *,
    issuers: Mapping[str, IdentityIssuer] | None = None,
    throttle: Any = None,
    limiter_for: Any = None,
    counted: list[str] | None = None,
    run_blocking: Any = at_once,
) -> Gates:
    def issuers_for(configs: Sequence[OIDCConfig]) -> Mapping[str, IdentityIssuer]:
        known = issuers or {}
        return {config.name: known[config.name] for config in configs if config.name in known}

    return Gates(
        clock=clock,
        run_blocking=run_blocking,
        issuers_for=issuers_for,
        throttle=throttle,
        limiter_for=limiter_for,
        count=(counted.append if counted is not None else lambda result: None),
    )


OIDC = (OIDCConfig(name="ci", issuer="https://issuer.example", audience=SERVICE),)


def make_gate(
    clock: Callable[[], float] | None = None,
    *,
    routes: Sequence[Route] | None = None,
    limits: LimitsConfig | None = None,
    **gate_parts: Any,
) -> Gate:
    table = RouteTable(
        tuple(routes or (route(),)),
        auth=auth(oidc=OIDC),
        limits=limits,
    )
    gates = make_gates(clock or Clock(), **gate_parts)
    gate = gates(table)
    assert gate is not None
    return gate
