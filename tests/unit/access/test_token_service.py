"""/_token as the proxy's own token service: grants, refusals, secrets kept out of sight."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import Clock as TaskClock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from regproxy.access.gate import Client, Gate
from regproxy.access.limits import LoginThrottle
from regproxy.access.token_service import Issued, TokenAsk, issue, parse_ask
from regproxy.config import OIDCConfig
from regproxy.protocol.errors import OCIError
from tests.unit.access.gates import (
    PASSWORDS,
    PLAIN,
    SAFE,
    SERVICE,
    Clock,
    CountingThrottle,
    FakeIssuer,
    make_gate,
)

HOST = "proxy.example"
PLAIN_SAFE = Client("192.0.2.66", secure=True)


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def run(gate: Gate, ask: TokenAsk, client: Client = SAFE) -> dict[str, Any]:
    result: list[Any] = []
    failures: list[Any] = []
    ensureDeferred(issue(gate, ask, client=client, host=HOST, service=SERVICE)).addCallbacks(
        result.append, failures.append
    )
    if failures:
        failures[0].raiseException()
    return json.loads(result[0].body)


def refused(gate: Gate, ask: TokenAsk, client: Client = SAFE) -> OCIError:
    with pytest.raises(OCIError) as caught:
        run(gate, ask, client)
    return caught.value


def granted(gate: Gate, answer: dict[str, Any]) -> frozenset[str]:
    return gate.verifier.grant(answer["token"], SERVICE).repositories


def scopes(*names: str, actions: str = "pull") -> list[tuple[str, str]]:
    return [("scope", f"repository:{name}:{actions}") for name in names]


def test_basic_credentials_get_the_scopes_the_rules_admit_and_no_others() -> None:
    gate = make_gate()
    ask = parse_ask(
        scopes("team-a/app", "secret/x", "other/y"), None, basic("alice", PASSWORDS["alice"])
    )
    answer = run(gate, ask)
    assert granted(gate, answer) == {"team-a/app", "other/y"}
    assert answer["access_token"] == answer["token"]
    assert answer["expires_in"] == 300 and answer["issued_at"].endswith("Z")
    assert "refresh_token" not in answer


def test_push_is_never_granted() -> None:
    gate = make_gate()
    answer = run(
        gate,
        parse_ask(scopes("team-a/app", actions="push"), None, basic("alice", PASSWORDS["alice"])),
    )
    assert granted(gate, answer) == frozenset()
    answer = run(
        gate,
        parse_ask(
            scopes("team-a/app", actions="pull,push"), None, basic("alice", PASSWORDS["alice"])
        ),
    )
    claims = json.loads(base64.urlsafe_b64decode(answer["token"].split(".")[1] + "=="))
    assert claims["access"] == [{"type": "repository", "name": "team-a/app", "actions": ["pull"]}]


def test_the_token_is_for_this_proxy() -> None:
    gate = make_gate()
    answer = run(gate, parse_ask(scopes("public/x"), None, None))
    claims = json.loads(base64.urlsafe_b64decode(answer["token"].split(".")[1] + "=="))
    assert (claims["aud"], claims["iss"], claims["sub"]) == (SERVICE, "regproxy", "")
    assert claims["exp"] - claims["iat"] == 300


def test_anonymous_clients_get_what_anonymous_may_pull() -> None:
    gate = make_gate()
    answer = run(gate, parse_ask(scopes("public/x", "team-a/app"), None, None))
    assert granted(gate, answer) == {"public/x"}


def test_the_password_grant_answers_with_a_refresh_token_that_works() -> None:
    gate = make_gate()
    form = [("grant_type", "password"), ("username", "alice"), ("password", PASSWORDS["alice"])]
    form += [("service", SERVICE), ("client_id", "docker"), ("access_type", "offline")]
    first = run(gate, parse_ask([], form, None))
    assert "refresh_token" in first
    refresh = [("grant_type", "refresh_token"), ("refresh_token", first["refresh_token"])]
    second = run(gate, parse_ask([], [*refresh, ("scope", "repository:team-a/app:pull")], None))
    assert granted(gate, second) == {"team-a/app"}


def test_offline_token_on_get_asks_for_a_refresh_token() -> None:
    gate = make_gate()
    answer = run(
        gate, parse_ask([("offline_token", "true")], None, basic("bob", PASSWORDS["bob"]))
    )
    assert "refresh_token" in answer


def test_a_refresh_token_of_a_removed_user_is_refused() -> None:
    gate = make_gate()
    form = [("grant_type", "password"), ("username", "alice"), ("password", PASSWORDS["alice"])]
    refresh = run(gate, parse_ask([], form, None))["refresh_token"]
    assert gate.auth is not None
    users = {k: v for k, v in gate.auth.users.items() if k != "alice"}
    asked = parse_ask([], [("grant_type", "refresh_token"), ("refresh_token", refresh)], None)
    assert refused(_gate_with_users(gate, users), asked).status == 401


def test_a_wrong_password_and_an_unknown_user_get_the_same_answer() -> None:
    gate = make_gate()
    wrong = refused(gate, parse_ask([], None, basic("alice", "nope")))
    unknown = refused(gate, parse_ask([], None, basic("mallory", "nope")))
    assert (wrong.status, wrong.body()) == (unknown.status, unknown.body())
    assert wrong.status == 401


def test_failed_logins_are_throttled_per_address() -> None:
    throttle = CountingThrottle(limit=2)
    counted: list[str] = []
    gate = make_gate(throttle=throttle, counted=counted)
    for _ in range(2):
        refused(gate, parse_ask([], None, basic("alice", "nope")))
    error = refused(gate, parse_ask([], None, basic("alice", PASSWORDS["alice"])))
    assert (error.status, error.code) == (429, "TOOMANYREQUESTS")
    assert counted == ["failed", "failed", "throttled"]
    other = Client("198.51.100.9", secure=True)
    run(gate, parse_ask([], None, basic("alice", PASSWORDS["alice"])), client=other)
    assert throttle.successes == ["198.51.100.9"]


def test_credentials_over_plain_http_are_refused_with_the_fix() -> None:
    counted: list[str] = []
    gate = make_gate(counted=counted)
    error = refused(gate, parse_ask([], None, basic("alice", PASSWORDS["alice"])), client=PLAIN)
    assert error.status == 403
    assert "\n" not in error.message and "--insecure-auth" in error.message
    assert counted == ["plain_http"]
    # Anonymous token requests carry no credentials: fine over plain HTTP.
    run(gate, parse_ask(scopes("public/x"), None, None), client=PLAIN)


def test_a_workload_jwt_as_password_gets_its_issuers_principal() -> None:
    gate = make_gate(issuers={"ci": FakeIssuer({"jwt-of-a": "repo:acme/a:ref:refs/heads/main"})})
    answer = run(
        gate, parse_ask(scopes("team-a/app", "team-b/app"), None, basic("ci", "jwt-of-a"))
    )
    grant = gate.verifier.grant(answer["token"], SERVICE)
    assert grant.subject == "ci:repo:acme/a:ref:refs/heads/main"
    assert grant.repositories == {"team-a/app", "team-b/app"}  # team-b: "users"
    assert "refresh_token" not in run(
        gate, parse_ask([("offline_token", "true")], None, basic("ci", "jwt-of-a"))
    )


def test_a_refused_workload_jwt_is_a_401_and_a_failed_login() -> None:
    throttle = CountingThrottle()
    gate = make_gate(issuers={"ci": FakeIssuer({})}, throttle=throttle)
    assert refused(gate, parse_ask([], None, basic("ci", "forged"))).status == 401
    assert throttle.failures == {"127.0.0.1": 1}


@pytest.mark.parametrize(
    ("query", "form", "authorization"),
    [
        ([], [("grant_type", "client_credentials")], None),
        ([], [("grant_type", "password"), ("password", "x")], None),
        ([], [("grant_type", "refresh_token")], None),
        ([], None, b"Basic !!!"),
        ([], None, b"Basic " + base64.b64encode(b"no-colon")),
    ],
)
def test_malformed_token_requests(query: Any, form: Any, authorization: bytes | None) -> None:
    with pytest.raises(OCIError) as caught:
        parse_ask(query, form, authorization)
    assert caught.value.status in (400, 401)


def test_secrets_never_reach_a_log_line_or_an_error_body() -> None:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        gate = make_gate(issuers={"ci": FakeIssuer({})})
        bodies = [
            refused(gate, parse_ask([], None, basic("alice", "wrong-Pa55word"))).body(),
            refused(
                gate, parse_ask([], None, basic("ci", "eyJhbGciOiJFUzI1NiJ9.eyJ4IjoxfQ.c2ln"))
            ).body(),
            refused(
                gate,
                parse_ask(
                    [],
                    [("grant_type", "refresh_token"), ("refresh_token", "eyJr.eyJz.c2ln")],
                    None,
                ),
            ).body(),
            refused(
                gate, parse_ask([], None, basic("alice", PASSWORDS["alice"])), client=PLAIN
            ).body(),
        ]
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = repr(events) + "\n".join(formatEvent(e) for e in events) + b"".join(bodies).decode()
    for secret in ("wrong-Pa55word", "eyJhbGciOiJFUzI1NiJ9", "eyJr", PASSWORDS["alice"]):
        assert secret not in text
    assert "ci token refused: ValueError" in text
    assert "wrong-Pa55word" not in repr(parse_ask([], None, basic("alice", "wrong-Pa55word")))


def test_issuers_are_the_configured_ones() -> None:
    assert make_gate(clock=Clock()).issuers == {}
    assert OIDCConfig(name="ci", issuer="https://i", audience="a").username_claim == "sub"


def _gate_with_users(gate: Gate, users: dict[str, bytes]) -> Gate:
    import attrs

    from regproxy.access.users import Users
    from regproxy.routing.matching import RouteTable
    from tests.unit.access.gates import at_once

    assert gate.auth is not None
    return Gate(
        RouteTable(gate.table.routes, auth=attrs.evolve(gate.auth, users=users)),
        key=gate.key,
        users=Users(users, at_once),
        issuers={},
        clock=gate.clock,
        throttle=gate.throttle,
        limiter=None,
        count=lambda result: None,
    )


def test_a_changed_password_ends_the_refresh_tokens_issued_before() -> None:
    import bcrypt

    gate = make_gate()
    form = [("grant_type", "password"), ("username", "alice"), ("password", PASSWORDS["alice"])]
    refresh = run(gate, parse_ask([], form, None))["refresh_token"]
    assert gate.auth is not None
    users = dict(gate.auth.users)
    same = _gate_with_users(gate, users)
    asked = parse_ask([], [("grant_type", "refresh_token"), ("refresh_token", refresh)], None)
    run(same, asked)  # the same hash: still good
    users["alice"] = bcrypt.hashpw(b"a new password", bcrypt.gensalt(4))
    assert refused(_gate_with_users(gate, users), asked).status == 401


def test_anonymous_clients_get_no_refresh_token() -> None:
    gate = make_gate()
    assert "refresh_token" not in run(gate, parse_ask([("offline_token", "true")], None, None))


def test_insecure_auth_of_the_command_line_outlives_reloads() -> None:
    from regproxy.access.gate import Gates
    from regproxy.routing.matching import RouteTable
    from tests.unit.access.gates import at_once, auth, route

    gates = Gates(clock=Clock(), run_blocking=at_once, issuers_for=lambda c: {}, insecure=True)
    gate = gates(RouteTable((route(),), auth=auth()))
    assert gate is not None and gate.insecure
    run(gate, parse_ask([], None, basic("alice", PASSWORDS["alice"])), client=PLAIN)


def test_scopes_of_path_routes_follow_their_routes_rules() -> None:
    from regproxy.config import AccessRule
    from tests.unit.access.gates import route

    hub = route(name="hub", path="hub", access=(AccessRule(("library/*",), ("anonymous",)),))
    gate = make_gate(routes=[route(), hub])
    answer = run(
        gate, parse_ask(scopes("hub/library/alpine", "hub/acme/x", "public/y"), None, None)
    )
    assert granted(gate, answer) == {"hub/library/alpine", "public/y"}


def holding() -> tuple[list[tuple[Deferred[bool], Callable[[], bool]]], Any]:
    """A run_blocking that holds each check until the test releases it."""
    held: list[tuple[Deferred[bool], Callable[[], bool]]] = []

    def hold(work: Callable[[], bool]) -> Deferred[bool]:
        held.append((Deferred(), work))
        return held[-1][0]

    return held, hold


def start(gate: Gate, ask: TokenAsk, client: Client, ends: list[Any]) -> Deferred[Issued]:
    issuing = ensureDeferred(issue(gate, ask, client=client, host=HOST, service=SERVICE))
    return issuing.addBoth(ends.append)


def test_parallel_guesses_from_one_address_check_at_most_the_limit() -> None:
    # The throttle must count a guess while bcrypt checks it: were it counted only once
    # checked, fifty guesses sent at once would all pass the throttle first.
    held, hold = holding()
    clock = TaskClock()
    gate = make_gate(throttle=LoginThrottle(clock), run_blocking=hold)  # type: ignore[arg-type]
    ends: list[Any] = []
    for _ in range(50):
        start(gate, parse_ask([], None, basic("alice", "nope")), PLAIN_SAFE, ends)
    assert (len(held), ends) == (10, [])  # the others wait: any of the ten may be good
    for deferred, work in held:
        deferred.callback(work())
    assert len(held) == 10
    errors = [end.value for end in ends]
    assert sorted(error.status for error in errors) == [401] * 10 + [429] * 40
    waits = {dict(error.headers).get(b"retry-after") for error in errors if error.status == 429}
    assert waits == {b"60"}
    # The window counts from the first failure: after it, the address may try again.
    clock.advance(59.5)
    again = refused(gate, parse_ask([], None, basic("alice", "nope")), PLAIN_SAFE)
    assert (again.status, dict(again.headers)[b"retry-after"]) == (429, b"1")
    clock.advance(0.5)
    start(gate, parse_ask([], None, basic("alice", "nope")), PLAIN_SAFE, ends)
    held[-1][0].callback(held[-1][1]())
    assert (len(held), ends[-1].value.status) == (11, 401)


def test_good_logins_in_parallel_wait_for_room_and_are_never_refused() -> None:
    # A burst of real users behind one address: ten checked at a time, none turned away.
    held, hold = holding()
    gate = make_gate(throttle=LoginThrottle(TaskClock()), run_blocking=hold)  # type: ignore[arg-type]
    ends: list[Any] = []
    for _ in range(30):
        start(gate, parse_ask([], None, basic("alice", PASSWORDS["alice"])), SAFE, ends)
    released = 0
    while released < len(held):
        assert len(held) - released <= 10
        deferred, work = held[released]
        released += 1
        deferred.callback(work())
    assert [type(end) for end in ends] == [Issued] * 30


def test_a_good_login_gives_its_place_to_a_waiting_guess_and_no_more() -> None:
    held, hold = holding()
    gate = make_gate(throttle=LoginThrottle(TaskClock(), failures=2), run_blocking=hold)  # type: ignore[arg-type]
    ends: list[Any] = []
    start(gate, parse_ask([], None, basic("alice", PASSWORDS["alice"])), SAFE, ends)
    for _ in range(3):
        start(gate, parse_ask([], None, basic("bob", "nope")), SAFE, ends)
    assert len(held) == 2
    held[0][0].callback(held[0][1]())  # alice: in, and bob's second guess is checked
    assert len(held) == 3
    for deferred, work in held[1:]:
        deferred.callback(work())
    assert sorted(getattr(end, "value", end).status for end in ends[1:]) == [401, 401, 429]
    assert type(ends[0]) is Issued


def test_a_waiting_attempt_whose_client_left_takes_no_place() -> None:
    held, hold = holding()
    throttle = LoginThrottle(TaskClock(), failures=1)  # type: ignore[arg-type]
    gate = make_gate(throttle=throttle, run_blocking=hold)
    ends: list[Any] = []
    start(gate, parse_ask([], None, basic("alice", PASSWORDS["alice"])), SAFE, ends)
    waiting = start(gate, parse_ask([], None, basic("alice", PASSWORDS["alice"])), SAFE, ends)
    waiting.cancel()
    held[0][0].callback(held[0][1]())
    assert len(held) == 1 and throttle.allowed(SAFE.address)
    assert type(ends[1]) is Issued and ends[0].check(CancelledError)


def test_a_check_that_never_ends_is_counted_as_a_failure() -> None:
    # A client that hangs up while bcrypt runs must not get its guess for free.
    held: list[Deferred[bool]] = []

    def hold(work: Callable[[], bool]) -> Deferred[bool]:
        held.append(Deferred())
        return held[-1]

    throttle = LoginThrottle(TaskClock(), failures=1)  # type: ignore[arg-type]
    gate = make_gate(throttle=throttle, run_blocking=hold)
    ask = parse_ask([], None, basic("alice", PASSWORDS["alice"]))
    issuing = ensureDeferred(issue(gate, ask, client=SAFE, host=HOST, service=SERVICE))
    issuing.addErrback(lambda failure: None)
    issuing.cancel()
    assert not throttle.allowed(SAFE.address)


def test_the_login_throttle_given_is_the_one_used_even_while_empty() -> None:
    # LoginThrottle has a len(), 0 at start-up: `throttle or NoThrottle()` dropped it.
    throttle = LoginThrottle(TaskClock())  # type: ignore[arg-type]
    assert len(throttle) == 0
    gate = make_gate(throttle=throttle)
    for _ in range(10):
        refused(gate, parse_ask([], None, basic("alice", "nope")))
    assert refused(gate, parse_ask([], None, basic("alice", "nope"))).status == 429


def test_a_post_takes_its_grant_and_credentials_from_the_form_only() -> None:
    # A password in the URL ends up in the logs of every proxy on the way.
    gate = make_gate()
    secret = PASSWORDS["alice"]
    in_query = [("grant_type", "password"), ("username", "alice"), ("password", secret)]
    form = [("grant_type", "password"), ("username", "alice"), ("password", "nope")]
    ask = parse_ask(in_query, form, None)
    assert (ask.username, ask.password) == ("alice", "nope")
    assert refused(gate, parse_ask(in_query, form[:2], None)).status == 401
    with pytest.raises(OCIError) as caught:
        parse_ask(in_query, [], None)
    assert caught.value.status == 400
    refresh = [("grant_type", "refresh_token"), ("refresh_token", "in-the-url")]
    with pytest.raises(OCIError):
        parse_ask(refresh, [("grant_type", "refresh_token")], None)
    # Scopes may come from either, as clients send them.
    both = parse_ask(scopes("public/x"), [*form, *scopes("public/y")], None)
    assert both.scopes == ("repository:public/x:pull", "repository:public/y:pull")
    offline = parse_ask([("access_type", "offline")], [*refresh[:1], ("refresh_token", "r")], None)
    assert not offline.offline
