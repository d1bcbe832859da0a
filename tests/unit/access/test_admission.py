"""Every /v2/ request: token, scope and rules checked each time."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from regproxy.access.admission import Denied, admit
from regproxy.access.gate import Client, Gate
from regproxy.access.tokens import TokenKey, access_claims
from regproxy.config import AccessRule, AuthConfig
from regproxy.protocol.errors import OCIError
from regproxy.routing.matching import RouteTable
from tests.unit.access.gates import (
    PLAIN,
    REALM,
    SAFE,
    SERVICE,
    Clock,
    make_gate,
    make_gates,
    route,
)

ROUTE = route()


def token(
    gate: Gate, subject: str, *names: str, key: TokenKey | None = None, **changes: Any
) -> bytes:
    claims = access_claims(
        subject=subject, audience=SERVICE, repositories=names, now=gate.clock(), ttl=300
    )
    claims.update(changes)
    return b"Bearer " + (key or gate.key).sign(claims).encode()


def ask(
    gate: Gate, name: str, authorization: bytes | None, client: Client = SAFE, **parts: Any
) -> str:
    return admit(
        gate,
        route=parts.get("route", ROUTE),
        name=name,
        client_name=parts.get("client_name", name),
        authorization=authorization,
        client=client,
        realm=REALM,
        service=SERVICE,
    ).principal


def refused(gate: Gate, name: str, authorization: bytes | None, **parts: Any) -> OCIError:
    with pytest.raises(OCIError) as caught:
        ask(gate, name, authorization, **parts)
    return caught.value


def challenge_of(error: OCIError) -> str:
    return dict(error.headers)[b"www-authenticate"].decode()


def test_a_token_with_the_scope_admits_its_principal() -> None:
    gate = make_gate()
    assert ask(gate, "team-a/app", token(gate, "alice", "team-a/app")) == "alice"


def test_no_credentials_for_a_closed_repository_is_a_401_challenge_naming_the_scope() -> None:
    error = refused(make_gate(), "team-a/app", None)
    assert (error.status, error.code) == (401, "UNAUTHORIZED")
    assert challenge_of(error) == (
        f'Bearer realm="{REALM}",service="{SERVICE}",scope="repository:team-a/app:pull"'
    )


def test_anonymous_repositories_need_no_token() -> None:
    assert ask(make_gate(), "public/x", None) == ""


def test_a_token_for_one_repository_does_not_open_another() -> None:
    gate = make_gate()
    error = refused(gate, "team-a/other", token(gate, "alice", "team-a/app"))
    assert error.status == 401
    assert 'error="insufficient_scope"' in challenge_of(error)
    assert 'scope="repository:team-a/other:pull"' in challenge_of(error)


def test_credentials_the_rules_do_not_admit_are_a_403() -> None:
    gate = make_gate()
    error = refused(gate, "team-a/app", token(gate, "carol", "team-a/app"))
    assert (error.status, error.code) == (403, "DENIED")
    # Named for the access log (who was refused), not in the body the client sees.
    assert isinstance(error, Denied) and error.principal == "carol"
    assert b"carol" not in error.body()


def test_an_anonymous_token_for_a_closed_repository_is_a_401() -> None:
    gate = make_gate()
    error = refused(gate, "team-a/app", token(gate, "", "team-a/app"))
    assert error.status == 401


@pytest.mark.parametrize(
    "changes",
    [{"exp": 999_000}, {"aud": "elsewhere.example"}, {"iss": "someone"}],
    ids=["expired", "audience", "issuer"],
)
def test_an_invalid_token_is_a_401_invalid_token(changes: dict[str, Any]) -> None:
    counted: list[str] = []
    gate = make_gate(counted=counted)
    error = refused(gate, "team-a/app", token(gate, "alice", "team-a/app", **changes))
    assert error.status == 401 and 'error="invalid_token"' in challenge_of(error)
    assert counted == ["invalid_token"]


def test_a_token_of_another_key_is_refused() -> None:
    gate = make_gate()
    error = refused(
        gate, "team-a/app", token(gate, "alice", "team-a/app", key=TokenKey.generate())
    )
    assert error.status == 401


def test_basic_credentials_do_not_open_v2() -> None:
    counted: list[str] = []
    error = refused(
        make_gate(counted=counted), "team-a/app", b"Basic YWxpY2U6YWxpY2Utc2VjcmV0LXB3"
    )
    assert (error.status, error.message) == (401, "use a token from the realm")
    assert counted == []  # no token was tried


def test_a_reload_that_removes_the_rule_closes_issued_tokens() -> None:
    clock = Clock()
    gates = make_gates(clock)
    before = gates(RouteTable((ROUTE,), auth=AuthConfig(users=make_gate().auth.users)))  # type: ignore[union-attr]
    assert before is not None
    issued = token(before, "alice", "team-a/app")
    assert ask(before, "team-a/app", issued) == "alice"
    narrowed = attrs.evolve(ROUTE, access=(AccessRule(("team-a/**",), ("bob",)),))
    after = gates(RouteTable((narrowed,), auth=before.auth))
    assert after is not None and after is not before
    assert refused(after, "team-a/app", issued, route=narrowed).status == 403


def test_a_reload_that_removes_the_user_closes_their_tokens() -> None:
    clock = Clock()
    gates = make_gates(clock)
    first = gates(RouteTable((ROUTE,), auth=make_gate().auth))
    assert first is not None and first.auth is not None
    issued = token(first, "alice", "team-a/app")
    users = {name: h for name, h in first.auth.users.items() if name != "alice"}
    second = gates(RouteTable((ROUTE,), auth=attrs.evolve(first.auth, users=users)))
    assert second is not None
    assert refused(second, "team-a/app", issued).status == 401


def test_a_reload_keeps_the_key_made_at_start_up() -> None:
    gates = make_gates(Clock())
    auth = make_gate().auth
    first = gates(RouteTable((ROUTE,), auth=auth))
    second = gates(RouteTable((ROUTE,), auth=auth))
    assert first is not None and second is not None and first is not second
    assert first.key is second.key


def test_the_same_table_gets_the_same_gate() -> None:
    gates = make_gates(Clock())
    table = RouteTable((ROUTE,), auth=make_gate().auth)
    assert gates(table) is gates(table)
    assert gates(RouteTable((ROUTE,))) is None


def test_a_users_token_over_plain_http_is_refused() -> None:
    gate = make_gate()
    error = refused(gate, "team-a/app", token(gate, "alice", "team-a/app"), client=PLAIN)
    assert error.status == 403 and "--insecure-auth" in error.message


def test_insecure_auth_accepts_plain_http() -> None:
    gate = make_gate()
    gate.insecure = True
    assert ask(gate, "team-a/app", token(gate, "alice", "team-a/app"), client=PLAIN) == "alice"


def test_an_anonymous_token_over_plain_http_is_fine() -> None:
    gate = make_gate()
    assert ask(gate, "public/x", token(gate, "", "public/x"), client=PLAIN) == ""


def test_the_ping_needs_a_valid_token_of_any_scope() -> None:
    gate = make_gate()
    assert ask(gate, "", token(gate, "alice"), route=None) == "alice"
    error = refused(gate, "", None, route=None)
    assert challenge_of(error) == f'Bearer realm="{REALM}",service="{SERVICE}"'


def test_the_catalog_is_refused() -> None:
    gate = make_gate()
    assert refused(gate, "", token(gate, "alice")).code == "DENIED"


def test_group_membership_is_read_from_the_configuration_in_force() -> None:
    gate = make_gate()
    assert ask(gate, "team-a/app", token(gate, "bob", "team-a/app")) == "bob"  # @ops


def test_a_workload_identity_matches_its_subject_glob() -> None:
    gate = make_gate(issuers={"ci": object()})  # type: ignore[dict-item]
    subject = "ci:repo:acme/a:ref:refs/heads/main"
    assert ask(gate, "team-a/app", token(gate, subject, "team-a/app")) == subject


def test_a_workload_identity_of_a_removed_issuer_is_refused() -> None:
    gate = make_gate()  # no issuer named "ci" in force
    error = refused(gate, "team-a/app", token(gate, "ci:repo:acme/a:x", "team-a/app"))
    assert error.status == 401


def test_rate_keys() -> None:
    from regproxy.config import LimitsConfig, RateLimit

    limits = LimitsConfig(anonymous=RateLimit.parse("100/6h"), users=RateLimit.parse("5000/6h"))
    gate = make_gate(limits=limits)
    assert gate.rate("alice", "192.0.2.1") == ("principal:alice", limits.users)
    assert gate.rate("", "192.0.2.1") == ("anonymous:192.0.2.1", limits.anonymous)
    assert gate.rate(None, "192.0.2.1") == ("anonymous:192.0.2.1", limits.anonymous)
    assert make_gate().rate("alice", "192.0.2.1") is None
