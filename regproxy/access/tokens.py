"""The proxy's own tokens: JWTs signed ES256 with the token key, and their verification.

Written out rather than left to a JWT library's options, because the checks are the point:
the header must say exactly ``ES256`` and this key's ``kid`` (no ``alg: none``, no HMAC
with the public key as secret), the signature must verify, ``iss`` and ``aud`` must be the
proxy's, and ``exp`` / ``nbf`` hold. Verified tokens are remembered (a signature check costs
~0.1 ms; a manifest GET must cost far less): a remembered token is still checked for expiry,
audience and scope on every request, and the memory belongs to one key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import load_pem_private_key

ISSUER = "regproxy"
ALGORITHM = "ES256"
# Seconds of clock difference tolerated between replicas for nbf and iat.
CLOCK_SKEW = 30.0
MAX_REMEMBERED = 10_000
MAX_TOKEN_LENGTH = 16 * 1024


class InvalidToken(Exception):
    """A token that is not (or no longer) one of the proxy's; ``reason`` is for logs."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("malformed") from None


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(32, "big")


class TokenKey:
    """The EC P-256 key that signs the proxy's tokens, with its ``kid``."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if private_key.curve.name != "secp256r1":
            raise ValueError("the token key must be an EC P-256 key")
        self._private = private_key
        self.public = private_key.public_key()
        numbers = self.public.public_numbers()
        # The RFC 7638 JWK thumbprint: the same key gives the same kid on every replica.
        jwk = json.dumps(
            {
                "crv": "P-256",
                "kty": "EC",
                "x": _b64(_int_bytes(numbers.x)),
                "y": _b64(_int_bytes(numbers.y)),
            },
            separators=(",", ":"),
            sort_keys=True,
        )
        self.kid = _b64(hashlib.sha256(jwk.encode()).digest())
        self._header = _b64(json.dumps({"alg": ALGORITHM, "kid": self.kid, "typ": "JWT"}).encode())

    def __repr__(self) -> str:
        return f"<TokenKey kid={self.kid}>"

    @classmethod
    def from_pem(cls, pem: bytes) -> TokenKey:
        key = load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the token key must be an EC P-256 key")
        return cls(key)

    @classmethod
    def generate(cls) -> TokenKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    def sign(self, claims: dict[str, Any]) -> str:
        signing_input = self._header + "." + _b64(json.dumps(claims).encode())
        der = self._private.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + _b64(_int_bytes(r) + _int_bytes(s))

    def claims(self, token: str) -> dict[str, Any]:
        """The claims of a token this key signed; InvalidToken otherwise (no time checks)."""
        if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
            raise InvalidToken("malformed")
        header_part, claims_part, signature_part = token.split(".")
        try:
            header = json.loads(_unb64(header_part))
            claims = json.loads(_unb64(claims_part))
        except (ValueError, UnicodeDecodeError):
            raise InvalidToken("malformed") from None
        if not isinstance(header, dict) or header.get("alg") != ALGORITHM:
            raise InvalidToken("algorithm")
        if header.get("kid") != self.kid:
            raise InvalidToken("key")
        signature = _unb64(signature_part)
        if len(signature) != 64:
            raise InvalidToken("signature")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            self.public.verify(
                der, f"{header_part}.{claims_part}".encode("ascii"), ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature:
            raise InvalidToken("signature") from None
        if not isinstance(claims, dict) or claims.get("iss") != ISSUER:
            raise InvalidToken("issuer")
        return claims


@attrs.frozen
class Grant:
    """What a verified access token says: who, for which proxy, until when, which names."""

    subject: str
    audience: str
    expires: float
    not_before: float
    repositories: frozenset[str]


@attrs.frozen
class Refresh:
    """What a verified refresh token says."""

    subject: str
    audience: str
    mark: str


def access_claims(
    *, subject: str, audience: str, repositories: Iterable[str], now: float, ttl: float
) -> dict[str, Any]:
    return {
        "iss": ISSUER,
        "sub": subject,
        "aud": audience,
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now + ttl),
        "jti": secrets.token_urlsafe(12),
        "access": [
            {"type": "repository", "name": name, "actions": ["pull"]}
            for name in sorted(set(repositories))
        ],
    }


def refresh_claims(
    *, subject: str, audience: str, mark: str, now: float, ttl: float
) -> dict[str, Any]:
    # "use" keeps the two kinds apart: a refresh token opens no repository, and an access
    # token refreshes nothing.
    return {
        "iss": ISSUER,
        "sub": subject,
        "aud": audience,
        "iat": int(now),
        "exp": int(now + ttl),
        "jti": secrets.token_urlsafe(12),
        "use": "refresh",
        "mark": mark,
    }


def _grant(claims: dict[str, Any]) -> Grant:
    if "use" in claims:
        raise InvalidToken("kind")
    subject, audience = claims.get("sub"), claims.get("aud")
    expires, not_before = claims.get("exp"), claims.get("nbf", 0)
    entries = claims.get("access")
    if not isinstance(subject, str) or not isinstance(audience, str):
        raise InvalidToken("claims")
    if not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) for t in (expires, not_before)
    ):
        raise InvalidToken("claims")
    if not isinstance(entries, list):
        raise InvalidToken("claims")
    names = set()
    for entry in entries:
        if (
            isinstance(entry, dict)
            and entry.get("type") == "repository"
            and isinstance(entry.get("name"), str)
            and "pull" in (entry.get("actions") or ())
        ):
            names.add(entry["name"])
    return Grant(subject, audience, float(expires), float(not_before), frozenset(names))  # type: ignore[arg-type]


class Verifier:
    """Access tokens of one key, verified once and remembered until they expire."""

    def __init__(self, key: TokenKey, clock: Callable[[], float]) -> None:
        self._key = key
        self._clock = clock
        self._known: dict[str, Grant] = {}

    def grant(self, token: str, audience: str) -> Grant:
        """The token's grant, if it is the proxy's, for ``audience``, and in its time."""
        now = self._clock()
        grant = self._known.get(token)
        if grant is None:
            grant = _grant(self._key.claims(token))
            if grant.not_before > now + CLOCK_SKEW:
                raise InvalidToken("not yet valid")
            if grant.expires > now:
                if len(self._known) >= MAX_REMEMBERED:
                    self._known = {t: g for t, g in self._known.items() if g.expires > now}
                    if len(self._known) >= MAX_REMEMBERED:
                        self._known.clear()
                self._known[token] = grant
        if grant.expires <= now:
            self._known.pop(token, None)
            raise InvalidToken("expired")
        if grant.audience != audience:
            raise InvalidToken("audience")
        return grant

    def refresh(self, token: str, audience: str) -> Refresh:
        claims = self._key.claims(token)
        subject, expires, mark = claims.get("sub"), claims.get("exp"), claims.get("mark")
        if claims.get("use") != "refresh" or not isinstance(subject, str):
            raise InvalidToken("kind")
        if not isinstance(expires, (int, float)) or expires <= self._clock():
            raise InvalidToken("expired")
        if claims.get("aud") != audience:
            raise InvalidToken("audience")
        return Refresh(subject, audience, mark if isinstance(mark, str) else "")
