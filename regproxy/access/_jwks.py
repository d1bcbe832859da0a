"""An issuer's signing keys (RFC 7517 JWK sets) as regproxy accepts them, and which key
may verify which algorithm.

Only asymmetric signature algorithms are accepted: a token can never choose ``none`` or
an HMAC (``HS*``), whose "secret" would be the issuer's *public* key. A key verifies only
the algorithms of its own type and curve, and only its declared ``alg`` when it has one,
so a token cannot pick a weaker reading of a key (RFC 8725, 3.1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm


class OIDCRefused(Exception):
    """A workload-identity token was not accepted.

    ``reason`` says why in a few words, safe to log and to show: it never holds the
    token, nor anything but short, plain values taken from it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Algorithm -> (key type, curve or None for any of that type's curves).
ALGORITHMS: Mapping[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}
# The curves each key type may have; others (secp256k1, X25519) are skipped at load.
_CURVES = {"EC": {"P-256", "P-384", "P-521"}, "OKP": {"Ed25519", "Ed448"}}
# The public members of each key type: private ones an issuer published by mistake are
# left out, so a key is always a public key.
_PUBLIC = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}
_LOADERS: Mapping[str, Any] = {
    "RSA": RSAAlgorithm.from_jwk,
    "EC": ECAlgorithm.from_jwk,
    "OKP": OKPAlgorithm.from_jwk,
}
MIN_RSA_BITS = 2048

_PLAIN = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def shown(value: object) -> str:
    """A value from a token or a key set as it may appear in a reason: short and plain."""
    return repr(value) if isinstance(value, str) and _PLAIN.fullmatch(value) else "(unprintable)"


@attrs.frozen
class Key:
    """One usable verification key of a JWK set."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    public_key: Any = attrs.field(eq=False, repr=False)

    def verifies(self, alg: str) -> bool:
        """Whether this key may check a signature made with ``alg``."""
        wanted = ALGORITHMS.get(alg)
        if wanted is None or wanted[0] != self.kty:
            return False
        if wanted[1] is not None and wanted[1] != self.crv:
            return False
        return self.alg is None or self.alg == alg


@attrs.frozen
class KeySet:
    keys: tuple[Key, ...]

    def for_token(self, kid: str | None, alg: str) -> Key | None:
        """The key that verifies a token with header ``kid`` and ``alg``, if any.

        A token without ``kid`` is accepted only when the set holds a single key: with
        several, picking one would mean trying them all against a forged token.
        """
        candidates: tuple[Key, ...]
        if kid is None:
            candidates = self.keys if len(self.keys) == 1 else ()
        else:
            candidates = tuple(key for key in self.keys if key.kid == kid)
        for key in candidates:
            if key.verifies(alg):
                return key
        return None

    def knows(self, kid: str | None) -> bool:
        return kid is None or any(key.kid == kid for key in self.keys)


def _load(entry: Mapping[str, Any]) -> Key | None:
    kty = entry.get("kty")
    if kty not in _PUBLIC:
        return None  # "oct" (a shared secret) never; unknown types are skipped
    if entry.get("use", "sig") != "sig":
        return None
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    kid, alg, crv = entry.get("kid"), entry.get("alg"), entry.get("crv")
    if kid is not None and not isinstance(kid, str):
        return None
    if alg is not None and alg not in ALGORITHMS:
        return None  # a key meant for an algorithm regproxy never accepts
    if kty in _CURVES and crv not in _CURVES[kty]:
        return None
    public = {"kty": kty, **{name: entry[name] for name in _PUBLIC[kty] if name in entry}}
    try:
        public_key = _LOADERS[kty](public)
    except Exception:  # PyJWT raises several types for a malformed key
        return None
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
        return None
    return Key(
        kid=kid, kty=kty, crv=crv if isinstance(crv, str) else None, alg=alg, public_key=public_key
    )


def parse_key_set(document: object) -> KeySet:
    """The usable keys of a JWKS document; keys regproxy cannot or must not use are skipped
    (a set may hold encryption keys, or types newer than this code)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise OIDCRefused("the issuer's JWKS has no 'keys' list")
    loaded = (_load(entry) for entry in document["keys"] if isinstance(entry, dict))
    return KeySet(tuple(key for key in loaded if key is not None))
