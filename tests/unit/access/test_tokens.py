"""The proxy's tokens: what verifies, and every way a token that should not, does not."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from regproxy.access.tokens import (
    InvalidToken,
    TokenKey,
    Verifier,
    access_claims,
    refresh_claims,
)
from tests.unit.access.gates import SERVICE, Clock

KEY = TokenKey.generate()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    made = access_claims(
        subject="alice", audience=SERVICE, repositories=["team-a/app"], now=1_000_000, ttl=300
    )
    made.update(changes)
    return made


def unsigned(header: dict[str, Any], body: dict[str, Any]) -> str:
    return b64(json.dumps(header).encode()) + "." + b64(json.dumps(body).encode())


def test_a_token_verifies_and_grants_its_repositories() -> None:
    grant = Verifier(KEY, Clock()).grant(KEY.sign(claims()), SERVICE)
    assert (grant.subject, grant.repositories) == ("alice", frozenset({"team-a/app"}))


def test_the_header_names_es256_and_the_key() -> None:
    header = json.loads(base64.urlsafe_b64decode(KEY.sign(claims()).split(".")[0] + "=="))
    assert header == {"alg": "ES256", "kid": KEY.kid, "typ": "JWT"}


def test_the_kid_is_the_same_for_the_same_key() -> None:
    pem = KEY._private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert TokenKey.from_pem(pem).kid == KEY.kid
    assert TokenKey.generate().kid != KEY.kid


def test_an_expired_token_is_refused() -> None:
    clock = Clock()
    token = KEY.sign(claims())
    verifier = Verifier(KEY, clock)
    verifier.grant(token, SERVICE)
    clock.now += 300  # exp is exclusive: at exp, the token is dead
    with pytest.raises(InvalidToken, match="expired"):
        verifier.grant(token, SERVICE)


def test_a_remembered_token_still_expires() -> None:
    """The memory of verified tokens must not outlive them."""
    clock = Clock()
    verifier = Verifier(KEY, clock)
    token = KEY.sign(claims())
    verifier.grant(token, SERVICE)
    clock.now += 299
    verifier.grant(token, SERVICE)
    clock.now += 1
    with pytest.raises(InvalidToken):
        verifier.grant(token, SERVICE)


def test_a_token_for_another_audience_is_refused() -> None:
    verifier = Verifier(KEY, Clock())
    token = KEY.sign(claims(aud="other.example"))
    with pytest.raises(InvalidToken, match="audience"):
        verifier.grant(token, SERVICE)


def test_a_remembered_token_is_checked_for_its_audience_every_time() -> None:
    verifier = Verifier(KEY, Clock())
    token = KEY.sign(claims())
    verifier.grant(token, SERVICE)
    with pytest.raises(InvalidToken, match="audience"):
        verifier.grant(token, "other.example")


def test_a_token_of_another_key_is_refused() -> None:
    other = TokenKey.generate()
    with pytest.raises(InvalidToken, match="key"):
        Verifier(KEY, Clock()).grant(other.sign(claims()), SERVICE)


def test_another_key_claiming_this_kid_is_refused() -> None:
    other = TokenKey.generate()
    other_token = other.sign(claims())
    _, body, signature = other_token.split(".")
    forged = unsigned({"alg": "ES256", "kid": KEY.kid, "typ": "JWT"}, claims()).split(".")[0]
    with pytest.raises(InvalidToken, match="signature"):
        Verifier(KEY, Clock()).grant(f"{forged}.{body}.{signature}", SERVICE)


def test_alg_none_is_refused() -> None:
    token = unsigned({"alg": "none", "kid": KEY.kid, "typ": "JWT"}, claims()) + "."
    with pytest.raises(InvalidToken, match="algorithm"):
        Verifier(KEY, Clock()).grant(token, SERVICE)


def test_hs256_with_the_public_key_as_secret_is_refused() -> None:
    public_pem = KEY.public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = unsigned({"alg": "HS256", "kid": KEY.kid, "typ": "JWT"}, claims())
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(InvalidToken, match="algorithm"):
        Verifier(KEY, Clock()).grant(f"{signing_input}.{b64(mac)}", SERVICE)


def test_a_changed_claim_breaks_the_signature() -> None:
    header, _, signature = KEY.sign(claims()).split(".")
    body = b64(
        json.dumps(
            claims(access=[{"type": "repository", "name": "secret/x", "actions": ["pull"]}])
        ).encode()
    )
    with pytest.raises(InvalidToken, match="signature"):
        Verifier(KEY, Clock()).grant(f"{header}.{body}.{signature}", SERVICE)


def test_a_token_of_another_issuer_is_refused() -> None:
    with pytest.raises(InvalidToken, match="issuer"):
        Verifier(KEY, Clock()).grant(KEY.sign(claims(iss="elsewhere")), SERVICE)


def test_a_token_not_yet_valid_is_refused() -> None:
    token = KEY.sign(claims(nbf=1_000_000 + 3600, exp=1_000_000 + 7200))
    with pytest.raises(InvalidToken, match="not yet"):
        Verifier(KEY, Clock()).grant(token, SERVICE)


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c", "....", "x" * 20000, "e30.e30.AAAA"])
def test_garbage_is_refused(token: str) -> None:
    with pytest.raises(InvalidToken):
        Verifier(KEY, Clock()).grant(token, SERVICE)


def test_a_refresh_token_opens_no_repository() -> None:
    refresh = KEY.sign(
        refresh_claims(subject="alice", audience=SERVICE, mark="m", now=1_000_000, ttl=600)
    )
    with pytest.raises(InvalidToken, match="kind"):
        Verifier(KEY, Clock()).grant(refresh, SERVICE)
    assert Verifier(KEY, Clock()).refresh(refresh, SERVICE).subject == "alice"


def test_an_access_token_refreshes_nothing() -> None:
    with pytest.raises(InvalidToken, match="kind"):
        Verifier(KEY, Clock()).refresh(KEY.sign(claims()), SERVICE)


def test_a_refresh_token_expires_and_has_an_audience() -> None:
    refresh = KEY.sign(
        refresh_claims(subject="alice", audience=SERVICE, mark="m", now=1_000_000, ttl=600)
    )
    with pytest.raises(InvalidToken, match="expired"):
        Verifier(KEY, Clock(1_000_600)).refresh(refresh, SERVICE)
    with pytest.raises(InvalidToken, match="audience"):
        Verifier(KEY, Clock()).refresh(refresh, "other.example")


def test_only_p256_keys_sign() -> None:
    with pytest.raises(ValueError):
        TokenKey(ec.generate_private_key(ec.SECP384R1()))


def test_the_key_never_shows_in_its_repr() -> None:
    assert "PRIVATE" not in repr(KEY) and KEY.kid in repr(KEY)
