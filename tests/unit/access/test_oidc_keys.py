"""An issuer's keys: discovery, JWKS, caching by the issuer's headers, refreshes on an
unknown key (rate limited), an issuer that is down, one fetch for many, bounded reads.

In memory: ``oidc_bench.FakeIssuer`` behind StubTreq, time on a Clock.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from regproxy.access._issuer import (
    DEFAULT_CACHE,
    FETCH_TIMEOUT,
    MAX_CACHE,
    MAX_DOCUMENT,
    MIN_CACHE,
    RETRY_WITHOUT_KEYS,
    cache_lifetime,
    discovery_url,
)
from regproxy.access.oidc import OIDCRefused
from regproxy.config import OIDCConfig
from tests.support.oidc_issuer import AUDIENCE, DISCOVERY_PATH, SUBJECT, SigningKey
from tests.unit.access.oidc_bench import ISSUER, JWKS_URI, Bench, outcome

DISCOVERY = ISSUER + DISCOVERY_PATH


def test_the_discovery_document_is_under_the_issuer() -> None:
    assert discovery_url("https://a.example") == "https://a.example" + DISCOVERY_PATH
    assert discovery_url("https://a.example/") == "https://a.example" + DISCOVERY_PATH
    assert discovery_url("https://a.example/id/7") == "https://a.example/id/7" + DISCOVERY_PATH


def test_keys_are_fetched_once_through_discovery_without_redirects_or_buffering() -> None:
    bench = Bench()
    assert bench.verify(bench.token()) == SUBJECT
    assert bench.verify(bench.token(alg="ES256")) == SUBJECT
    assert [url for url, _ in bench.http.calls] == [DISCOVERY, JWKS_URI]
    for _, kwargs in bench.http.calls:
        assert kwargs["allow_redirects"] is False
        assert kwargs["unbuffered"] is True


# -- cache lifetime ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "lifetime"),
    [
        ({}, DEFAULT_CACHE),
        ({"cache-control": ["max-age=300"]}, 300),
        ({"cache-control": ["public, max-age=3600, must-revalidate"]}, 3600),
        ({"cache-control": ["max-age=300"], "age": ["100"]}, 200),
        ({"cache-control": ['max-age="600"']}, 600),
        ({"cache-control": ["max-age=0"]}, MIN_CACHE),
        ({"cache-control": ["max-age=300"], "age": ["1000"]}, MIN_CACHE),
        ({"cache-control": ["max-age=999999999"]}, MAX_CACHE),
        ({"cache-control": ["no-store"]}, MIN_CACHE),
        ({"cache-control": ["max-age=600, no-cache"]}, MIN_CACHE),
        ({"cache-control": ["max-age=soon"]}, DEFAULT_CACHE),
        ({"cache-control": ["max-age=300"], "age": ["old"]}, 300),
    ],
)
def test_the_cache_lifetime_follows_the_headers_within_bounds(
    headers: dict[str, list[str]], lifetime: float
) -> None:
    assert cache_lifetime(Headers(headers)) == lifetime  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cache_control", "age", "lifetime"),
    [
        ("max-age=300", None, 300),
        ("max-age=300", "120", 180),
        ("max-age=1", None, MIN_CACHE),
        ("max-age=999999999", None, MAX_CACHE),
        (None, None, DEFAULT_CACHE),
    ],
)
def test_keys_are_fetched_again_when_their_cache_lifetime_ends(
    cache_control: str | None, age: str | None, lifetime: float
) -> None:
    bench = Bench()
    bench.issuer.cache_control, bench.issuer.age = cache_control, age
    bench.verify(bench.token())
    bench.advance(lifetime - 0.5)
    bench.verify(bench.token())
    assert bench.issuer.fetches() == 1
    bench.advance(0.5)
    bench.verify(bench.token())
    assert bench.issuer.fetches() == 2


# -- rotation and unknown keys -----------------------------------------------------------


def test_an_unknown_kid_refreshes_the_keys_at_most_once_a_minute() -> None:
    bench = Bench()
    bench.verify(bench.token())
    rotated = bench.mint.add_key("RS256")
    bench.advance(1)
    assert bench.refused(bench.token(key=rotated)) == f"no key '{rotated.kid}' at the issuer"
    assert bench.issuer.fetches() == 1  # the first fetch was a second ago
    bench.advance(MIN_CACHE - 1.5)
    bench.refused(bench.token(key=rotated))
    assert bench.issuer.fetches() == 1
    bench.advance(0.5)
    assert bench.verify(bench.token(key=rotated)) == SUBJECT
    assert bench.issuer.fetches() == 2
    # Made-up key ids, many of them: one refresh a minute, no more.
    stranger = SigningKey.generate("ES256", kid="never-published")
    for _ in range(int(MIN_CACHE) * 3):
        bench.refused(bench.token(key=stranger))
        bench.advance(1)
    assert bench.issuer.fetches() == 2 + 2  # at one and at two minutes


def test_a_known_kid_with_another_algorithm_does_not_refresh() -> None:
    bench = Bench()
    bench.verify(bench.token())
    bench.advance(MIN_CACHE)
    key = bench.mint.key("RS256")
    token = bench.token(key=key, headers={"alg": "RS384"})
    assert bench.refused(token) == f"the issuer's key '{key.kid}' is not for RS384"
    assert bench.issuer.fetches() == 1


def test_a_retired_key_is_refused_once_the_keys_are_fetched_again() -> None:
    bench = Bench()
    old = bench.mint.key("RS256")
    token = bench.token(key=old, lifetime=3600)
    bench.verify(token)
    new = bench.mint.add_key("RS256")
    bench.mint.retire_key(old.kid)
    bench.advance(299)
    assert bench.verify(token) == SUBJECT  # still cached
    bench.advance(1)
    assert bench.refused(token) == f"no key '{old.kid}' at the issuer"
    assert bench.verify(bench.token(key=new)) == SUBJECT


# -- an issuer that is down --------------------------------------------------------------


def test_an_unreachable_issuer_with_no_keys_held_is_a_refusal_retried_after_a_pause() -> None:
    bench = Bench()
    bench.http.down = True
    reason = bench.refused(bench.token())
    assert reason == (
        "no keys from the issuer: the discovery document could not be fetched "
        "(ConnectionRefusedError)"
    )
    bench.advance(RETRY_WITHOUT_KEYS - 0.5)
    assert bench.refused(bench.token()) == reason
    assert len(bench.http.calls) == 1
    bench.advance(0.5)
    bench.refused(bench.token())
    assert len(bench.http.calls) == 2
    bench.http.down = False
    bench.advance(RETRY_WITHOUT_KEYS)
    assert bench.verify(bench.token()) == SUBJECT


def test_keys_held_stay_in_use_when_a_refresh_fails() -> None:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        bench = Bench()
        bench.verify(bench.token())
        bench.http.down = True
        bench.advance(300)
        token = bench.token()
        assert bench.verify(token) == SUBJECT
        assert len(bench.http.calls) == 3  # discovery, JWKS, the failed discovery
        bench.advance(MIN_CACHE - 0.5)
        assert bench.verify(bench.token()) == SUBJECT
        assert len(bench.http.calls) == 3  # a failed refresh is not retried at once
        bench.advance(0.5)
        bench.verify(bench.token())
        assert len(bench.http.calls) == 4
    finally:
        globalLogPublisher.removeObserver(events)  # type: ignore[arg-type]
    logged = [formatEvent(e) for e in events if "key refresh failed" in e.get("log_format", "")]
    assert logged and "keeping the keys held" in logged[0]
    assert not any(part in line for line in logged for part in token.split("."))


def test_an_issuer_that_never_answers_times_out() -> None:
    bench = Bench()
    bench.issuer.hold = True
    waiting = bench.start(bench.token())
    assert not waiting.called
    bench.advance(FETCH_TIMEOUT - 0.5)
    assert not waiting.called
    bench.advance(0.5)
    result = outcome(waiting)
    assert isinstance(result, Failure) and isinstance(result.value, OIDCRefused)
    assert result.value.reason == f"no keys from the issuer: no answer within {FETCH_TIMEOUT:g} s"


# -- one fetch for many ------------------------------------------------------------------


def test_concurrent_verifications_share_one_fetch() -> None:
    bench = Bench()
    bench.issuer.hold = True
    waiting = [bench.start(bench.token(alg=alg)) for alg in ("RS256", "ES256", "RS256")]
    assert bench.issuer.requests[DISCOVERY] == 1
    bench.issuer.release()
    bench.flush()
    assert bench.issuer.requests[JWKS_URI] == 1
    assert not any(d.called for d in waiting)
    bench.issuer.release()
    bench.flush()
    assert [outcome(d) for d in waiting] == [SUBJECT] * 3
    assert bench.issuer.fetches() == 1


def test_a_verification_that_is_cancelled_leaves_the_shared_fetch_alone() -> None:
    bench = Bench()
    bench.issuer.hold = True
    first, second = bench.start(bench.token()), bench.start(bench.token())
    first.cancel()
    outcome(first)  # consumed: its CancelledError
    for _ in range(2):
        bench.issuer.release()
        bench.flush()
    assert outcome(second) == SUBJECT


# -- what the issuer's documents must be -------------------------------------------------


def refusal_with(bench: Bench, **settings: Any) -> str:
    for name, value in settings.items():
        setattr(bench.issuer, name, value)
    return bench.refused(bench.token()).removeprefix("no keys from the issuer: ")


def test_the_discovery_document_must_name_the_configured_issuer_exactly() -> None:
    bench = Bench()
    for other in (ISSUER + "/", "https://other.example", None):
        document = {"issuer": other, "jwks_uri": JWKS_URI}
        reason = refusal_with(bench, discovery=document)
        assert reason == "the discovery document names another issuer"
        bench.advance(RETRY_WITHOUT_KEYS)


def test_an_issuer_configured_with_a_trailing_slash_is_matched_as_written() -> None:
    issuer = ISSUER + "/"
    bench = Bench(OIDCConfig("github", issuer, AUDIENCE))
    bench.issuer.discovery = {"issuer": issuer, "jwks_uri": JWKS_URI}
    assert bench.verify(bench.token(iss=issuer)) == SUBJECT


@pytest.mark.parametrize("jwks_uri", ["http://keys.example/jwks", "/jwks", None, 7])
def test_the_jwks_uri_must_be_https(jwks_uri: Any) -> None:
    reason = refusal_with(Bench(), discovery={"issuer": ISSUER, "jwks_uri": jwks_uri})
    assert reason == "the discovery document has no https jwks_uri"


@pytest.mark.parametrize(
    ("url", "answer", "reason"),
    [
        (DISCOVERY, (404, {}, b"{}"), "the discovery document answered HTTP 404"),
        (
            DISCOVERY,
            (302, {"location": JWKS_URI}, b""),
            "the discovery document answered HTTP 302",
        ),
        (DISCOVERY, (200, {}, b"<html>"), "the discovery document is not JSON"),
        (DISCOVERY, (200, {}, b"[]"), "the discovery document is not a JSON object"),
        (JWKS_URI, (500, {}, b""), "the JWKS answered HTTP 500"),
        (JWKS_URI, (200, {}, b"\xff"), "the JWKS is not JSON"),
        (JWKS_URI, (200, {}, b'{"keys": {}}'), "the issuer's JWKS has no 'keys' list"),
        (
            JWKS_URI,
            (200, {}, b" " * (MAX_DOCUMENT + 1)),
            f"the JWKS is larger than {MAX_DOCUMENT} bytes",
        ),
    ],
)
def test_bad_issuer_answers_are_refusals_that_say_why(
    url: str, answer: tuple[int, dict[str, str], bytes], reason: str
) -> None:
    bench = Bench()
    assert refusal_with(bench, answer={url: answer}) == reason
    assert bench.issuer.requests[JWKS_URI] == (url == JWKS_URI)  # no redirect followed


def test_a_document_of_unknown_length_is_read_only_up_to_the_limit() -> None:
    bench = Bench()
    parts = [b" " * 65536] * (MAX_DOCUMENT // 65536) + [b" "]
    reason = refusal_with(bench, chunked={JWKS_URI: parts})
    assert reason == "the JWKS could not be read (OCIError)"


def test_a_document_of_exactly_the_limit_is_accepted() -> None:
    bench = Bench()
    document = json.dumps(bench.mint.jwks()).encode()
    padded = document + b" " * (MAX_DOCUMENT - len(document))
    bench.issuer.answer = {JWKS_URI: (200, {}, padded)}
    assert bench.verify(bench.token()) == SUBJECT


def test_a_fault_of_our_own_while_fetching_is_a_refusal_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = Bench()
    monkeypatch.setattr("regproxy.access._issuer.parse_key_set", lambda document: 1 / 0)
    errors: list[LogEvent] = []
    globalLogPublisher.addObserver(errors.append)
    try:
        assert bench.refused(bench.token()) == "no keys from the issuer: internal error"
    finally:
        globalLogPublisher.removeObserver(errors.append)
    assert any(e.get("log_failure") is not None for e in errors)
