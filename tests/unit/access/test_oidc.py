"""Workload-identity tokens: what is accepted, what is refused and why, in memory.

The issuer is ``oidc_bench.FakeIssuer`` behind StubTreq; time is a Clock far from the
wall clock. The fetching and caching of keys are in test_oidc_keys.py.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet.testing import MemoryReactorClock

from regproxy.access._jwks import MIN_RSA_BITS, parse_key_set
from regproxy.access.oidc import MAX_TOKEN, OIDCRefused, OIDCVerifier, oidc_verifiers
from regproxy.config import OIDCConfig
from tests.support.oidc_issuer import (
    AUDIENCE,
    BAD_KINDS,
    SUBJECT,
    SigningKey,
    b64json,
    b64url,
)
from tests.unit.access.oidc_bench import CONFIG, ISSUER, START, Bench

# -- accepted ----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_a_valid_token_gives_its_subject(alg: str) -> None:
    bench = Bench()
    assert bench.verify(bench.token(alg=alg)) == SUBJECT


def test_the_configured_claim_names_the_principal() -> None:
    bench = Bench(OIDCConfig("gitlab", ISSUER, AUDIENCE, username_claim="project_path"))
    assert bench.verify(bench.token(project_path="acme/app")) == "acme/app"


@pytest.mark.parametrize("value", [None, 42, ["acme/app"], ""])
def test_a_missing_or_non_string_claim_is_refused(value: Any) -> None:
    bench = Bench(OIDCConfig("gitlab", ISSUER, AUDIENCE, username_claim="project_path"))
    reason = bench.refused(bench.token(project_path=value))
    assert reason == "no string claim 'project_path'"


def test_an_audience_list_holding_ours_is_accepted() -> None:
    bench = Bench()
    assert bench.verify(bench.token(aud=["other", AUDIENCE])) == SUBJECT
    assert bench.refused(bench.token(aud=["other", "another"])) == "wrong audience (aud)"
    assert bench.refused(bench.token(aud=None)) == "wrong audience (aud)"


def test_the_issuer_must_match_exactly() -> None:
    bench = Bench()
    assert bench.refused(bench.token(iss=ISSUER + "/")) == "wrong issuer (iss)"
    assert bench.refused(bench.token(iss=None)) == "wrong issuer (iss)"


# -- every bad token of the test issuer --------------------------------------------------

EXPECTED = {
    "expired": "expired (exp)",
    "wrong_audience": "wrong audience (aud)",
    "wrong_issuer": "wrong issuer (iss)",
    "unknown_kid": "no key 'never-published' at the issuer",
    "alg_none": "algorithm 'none' not accepted",
    "hs256_public_pem": "algorithm 'HS256' not accepted",
    "future_nbf": "not valid yet (nbf)",
}


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_tokens_are_refused_saying_why_without_the_token(kind: str) -> None:
    bench = Bench()
    bench.verify(bench.token())  # keys held: the refusal is the token's own
    token = bench.mint.bad(kind, now=bench.clock.seconds())
    reason = bench.refused(token)
    assert reason == EXPECTED[kind]
    assert not any(part and part in reason for part in token.split("."))


# -- time: the injected clock and the leeway ---------------------------------------------


def test_time_is_the_injected_clock_not_the_wall_clock() -> None:
    bench = Bench()
    assert bench.verify(bench.token()) == SUBJECT  # minted at START, decades ago
    assert bench.refused(bench.mint.mint(nbf=None)) == "issued in the future (iat)"  # now


def test_expiry_has_the_default_leeway_of_a_minute_and_no_more() -> None:
    bench = Bench()
    token = bench.token(lifetime=100)
    bench.advance(159.5)
    assert bench.verify(token) == SUBJECT
    bench.advance(0.5)
    assert bench.refused(token) == "expired (exp)"


def test_with_no_leeway_a_token_expires_at_exp() -> None:
    bench = Bench(leeway=0.0)
    token = bench.token(lifetime=100)
    bench.advance(99.5)
    assert bench.verify(token) == SUBJECT
    bench.advance(0.5)
    assert bench.refused(token) == "expired (exp)"


def test_not_before_and_issued_at_have_the_leeway() -> None:
    bench = Bench(leeway=60.0)
    now = bench.clock.seconds()
    assert bench.verify(bench.token(nbf=now + 60, iat=now)) == SUBJECT
    assert bench.refused(bench.token(nbf=now + 61, iat=now)) == "not valid yet (nbf)"
    assert bench.verify(bench.token(iat=now + 60, nbf=None)) == SUBJECT
    assert bench.refused(bench.token(iat=now + 61, nbf=None)) == "issued in the future (iat)"


def test_nbf_and_iat_are_optional_but_exp_is_not() -> None:
    bench = Bench()
    assert bench.verify(bench.token(nbf=None, iat=None)) == SUBJECT
    assert bench.refused(bench.token(exp=None)) == "no expiry (exp)"


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["tomorrow", True, [1]])
def test_a_time_claim_that_is_not_a_number_is_refused(claim: str, value: Any) -> None:
    bench = Bench()
    assert bench.refused(bench.token(**{claim: value})) == f"{claim} is not a number"


# -- algorithms and keys -----------------------------------------------------------------


def forged(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"x" * 64) -> str:
    return f"{b64json(header)}.{b64json(claims)}.{b64url(signature)}"


@pytest.mark.parametrize("alg", ["none", "None", "HS256", "HS384", "HS512", "ES256K", 7, None])
def test_only_asymmetric_algorithms_are_accepted(alg: Any) -> None:
    bench = Bench()
    kid = bench.mint.key("RS256").kid
    reason = bench.refused(forged({"alg": alg, "kid": kid}, bench.mint.claims(now=START)))
    assert reason.startswith("algorithm ") and reason.endswith(" not accepted")


def test_an_rsa_key_does_not_verify_an_ec_algorithm_nor_a_curve_another() -> None:
    bench = Bench()
    claims = bench.mint.claims(now=START)
    rsa_kid, ec_kid = bench.mint.key("RS256").kid, bench.mint.key("ES256").kid
    assert (
        bench.refused(forged({"alg": "ES256", "kid": rsa_kid}, claims))
        == f"the issuer's key '{rsa_kid}' is not for ES256"
    )
    assert (
        bench.refused(forged({"alg": "ES384", "kid": ec_kid}, claims))
        == f"the issuer's key '{ec_kid}' is not for ES384"
    )
    assert (
        bench.refused(forged({"alg": "RS256", "kid": ec_kid}, claims))
        == f"the issuer's key '{ec_kid}' is not for RS256"
    )


def test_a_key_with_an_alg_verifies_only_that_alg() -> None:
    bench = Bench()
    key = bench.mint.key("RS256")
    claims = bench.mint.claims(now=START)
    token = jwt.encode(claims, key.private_key, algorithm="PS256", headers={"kid": key.kid})
    assert bench.refused(token) == f"the issuer's key '{key.kid}' is not for PS256"
    # The same key published without "alg": any RSA algorithm.
    bench.issuer.jwks = {"keys": [{k: v for k, v in key.jwk.items() if k != "alg"}]}
    bench.advance(300)
    assert bench.verify(token) == SUBJECT


def test_a_signature_by_another_key_with_a_published_kid_is_refused() -> None:
    bench = Bench()
    published = bench.mint.key("RS256")
    impostor = SigningKey.generate("RS256", kid=published.kid)
    assert bench.refused(bench.token(key=impostor)) == "bad signature"


def test_a_token_without_kid_needs_a_single_key_set() -> None:
    bench = Bench()
    key = bench.mint.key("ES256")
    token = jwt.encode(bench.mint.claims(now=START), key.private_key, algorithm="ES256")
    reason = "the token names no key (kid) and the issuer has several"
    assert bench.refused(token) == reason
    bench.mint.retire_key(bench.mint.key("RS256").kid)
    bench.advance(300)
    assert bench.verify(token) == SUBJECT


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a.b",
        "a.b.c.d",
        "not a token",
        "e30.e30.e30",  # {} header: no alg
        b64url(b"[1]") + ".e30.",
        b64url(b"\xff\xfe") + ".e30.",
        "x" * (MAX_TOKEN + 1),
    ],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    assert Bench().refused(token).startswith(("not a JWT", "algorithm "))


def test_critical_header_extensions_are_refused() -> None:
    bench = Bench()
    # RFC 7797's unencoded payload is the one PyJWT understands; regproxy takes none.
    kid = bench.mint.key("RS256").kid
    header = {"alg": "RS256", "kid": kid, "crit": ["b64"], "b64": True}
    token = forged(header, bench.mint.claims(now=START))
    assert bench.refused(token) == "critical header extensions are not supported"
    token = bench.token(headers={"crit": ["exp"], "exp": 1})
    assert bench.refused(token) == "not a JWT (malformed header)"


@pytest.mark.parametrize(
    "claims", [b"[1, 2]", b"not json", b'"string"'], ids=["array", "text", "string"]
)
def test_signed_claims_that_are_not_an_object_are_refused(claims: bytes) -> None:
    bench = Bench()
    key = bench.mint.key("RS256")
    token = jwt.api_jws.encode(
        claims, key.private_key, algorithm="RS256", headers={"kid": key.kid}
    )
    assert bench.refused(token).startswith("the claims are not")


def test_padded_or_otherwise_respelled_tokens_are_refused() -> None:
    bench = Bench()
    header, claims, signature = bench.token().split(".")
    padding = "=" * (-len(signature) % 4) or "===="
    for respelled in (
        f"{header}.{claims}.{signature}{padding}",
        f"{header}.{claims}!.{signature}",
    ):
        assert bench.refused(respelled) == "not a JWT (not canonical base64url)"


# -- the key set as loaded ---------------------------------------------------------------


def test_only_public_signature_keys_are_loaded_from_a_key_set() -> None:
    rsa_key = SigningKey.generate("RS256", kid="good")
    private_jwk = RSAAlgorithm.to_jwk(rsa_key.private_key, as_dict=True)
    private_jwk.update(kid="private", key_ops=["verify"])
    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS // 2)
    k256 = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256K1()).public_key(), as_dict=True)
    keys = parse_key_set(
        {
            "keys": [
                rsa_key.jwk,
                private_jwk,
                {**rsa_key.jwk, "kid": "enc", "use": "enc"},
                {**rsa_key.jwk, "kid": "ops", "key_ops": ["encrypt"]},
                {**rsa_key.jwk, "kid": "hs", "alg": "HS256"},
                {**rsa_key.jwk, "kid": 7},
                {**RSAAlgorithm.to_jwk(weak_key.public_key(), as_dict=True), "kid": "weak"},
                {**k256, "kid": "k256"},
                {"kty": "oct", "k": b64url(b"secret"), "kid": "oct"},
                {"kty": "OKP", "crv": "X25519", "x": b64url(b"x" * 32), "kid": "x25519"},
                {"kty": "RSA", "n": "!!", "e": "AQAB", "kid": "broken"},
                "not a key",
            ]
        }
    ).keys
    assert [key.kid for key in keys] == ["good", "private"]
    assert not hasattr(keys[1].public_key, "private_numbers")


@pytest.mark.parametrize("document", [[], {}, {"keys": "none"}, "keys"])
def test_a_key_set_without_a_keys_list_is_refused(document: Any) -> None:
    with pytest.raises(OIDCRefused, match="no 'keys' list"):
        parse_key_set(document)


# -- construction ------------------------------------------------------------------------


def test_an_issuer_must_be_https() -> None:
    with pytest.raises(ValueError, match="must be an https URL"):
        OIDCVerifier(
            OIDCConfig("x", "http://issuer.example", AUDIENCE), reactor=MemoryReactorClock()
        )


def test_verifiers_are_keyed_by_name_and_trust_their_ca(tmp_path: Any) -> None:
    configs = [CONFIG, OIDCConfig("gitlab", "https://gitlab.example", AUDIENCE)]
    verifiers = oidc_verifiers(configs, MemoryReactorClock())
    assert {name: v.config for name, v in verifiers.items()} == {
        "github": CONFIG,
        "gitlab": configs[1],
    }
    not_a_ca = tmp_path / "ca.pem"
    not_a_ca.write_text("nothing here\n")
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        oidc_verifiers(
            [OIDCConfig("k8s", ISSUER, AUDIENCE, ca=str(not_a_ca))], MemoryReactorClock()
        )


# -- property: a token is accepted only as it was signed ---------------------------------

_BENCH: dict[str, Any] = {}


def _held_bench() -> tuple[Bench, dict[str, str]]:
    """One verifier with its keys held, and a valid token per algorithm (no I/O after)."""
    if not _BENCH:
        bench = Bench()
        _BENCH["bench"] = bench
        _BENCH["tokens"] = {alg: bench.token(alg=alg) for alg in ("RS256", "ES256")}
        for token in _BENCH["tokens"].values():
            bench.verify(token)
    return _BENCH["bench"], _BENCH["tokens"]


def _segment_mutation(token: str, data: st.DataObject) -> str:
    """Flip bits inside one decoded segment, re-encoded canonically (reaches the checks
    behind the base64url ones)."""
    parts = token.split(".")
    index = data.draw(st.integers(0, 2), label="segment")
    raw = bytearray(base64.urlsafe_b64decode(parts[index] + "=" * (-len(parts[index]) % 4)))
    position = data.draw(st.integers(0, len(raw) - 1), label="byte")
    raw[position] ^= data.draw(st.integers(1, 255), label="xor")
    parts[index] = b64url(bytes(raw))
    return ".".join(parts)


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ "


def _text_mutation(token: str, data: st.DataObject) -> str:
    """Replace, insert or delete characters anywhere in the token's text."""
    position = data.draw(st.integers(0, len(token)), label="position")
    action = data.draw(st.sampled_from(["replace", "insert", "delete"]), label="action")
    if action == "insert":
        return token[:position] + data.draw(st.sampled_from(_ALPHABET)) + token[position:]
    end = position + data.draw(st.integers(1, 8), label="length")
    if action == "delete":
        return token[:position] + token[end:]
    return token[:position] + data.draw(st.text(_ALPHABET, min_size=1, max_size=8)) + token[end:]


def _edge_mutation(token: str, data: st.DataObject) -> str:
    """Respell a segment's end, where other spellings of the same bytes hide: '='
    padding, or a last character differing only in its unused low bits."""
    ends = [i for i, c in enumerate(token) if c == "."] + [len(token)]
    end = data.draw(st.sampled_from(ends), label="segment end")
    if data.draw(st.booleans(), label="pad"):
        return token[:end] + data.draw(st.sampled_from(["=", "==", "==="])) + token[end:]
    return token[: end - 1] + data.draw(st.sampled_from(_ALPHABET)) + token[end:]


MUTATIONS = {"deep": _segment_mutation, "text": _text_mutation, "edge": _edge_mutation}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    alg=st.sampled_from(["RS256", "ES256"]), data=st.data(), kind=st.sampled_from(list(MUTATIONS))
)
def test_a_mutated_token_is_never_accepted(alg: str, data: st.DataObject, kind: str) -> None:
    bench, tokens = _held_bench()
    token = tokens[alg]
    mutated = MUTATIONS[kind](token, data)
    fetches = bench.issuer.fetches()
    if mutated == token:
        assert bench.verify(mutated) == SUBJECT
        return
    try:
        accepted = bench.verify(mutated)
    except OIDCRefused as refused:
        assert not any(len(part) >= 16 and part in refused.reason for part in mutated.split("."))
    else:
        decoded = [json.loads(base64.urlsafe_b64decode(p + "==")) for p in mutated.split(".")[:2]]
        raise AssertionError(f"accepted a mutated token ({accepted}): {decoded}")
    # A mutation may name an unknown kid; refreshing for it is rate limited (clock fixed).
    assert bench.issuer.fetches() == fetches
