"""Workload identity: a CI job or a pod logs in with the OIDC token its platform gave it.

GitHub Actions, GitLab CI and Kubernetes issue short-lived JWTs signed by keys they
publish (OpenID Connect Discovery and a JWKS). A client logs in to the proxy with an
``[[auth.oidc]]`` provider's ``name`` as user name and such a token as password; the
verifier checks the token against that issuer's keys (``_issuer``, ``_jwks``) and its
claims against the configuration, and names the principal by ``username_claim``.

Time comes from the injected reactor, never ``time.time()``: the checks of ``exp``,
``nbf`` and ``iat`` are tested on a clock the tests move.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import jwt
from twisted.internet.interfaces import IReactorTime

from ..config import OIDCConfig
from ..upstream.treq_client import UpstreamPool, make_client, make_pool
from ._issuer import IssuerKeys
from ._jwks import ALGORITHMS, Key, OIDCRefused, shown

__all__ = ["OIDCRefused", "OIDCVerifier", "oidc_verifiers"]

DEFAULT_LEEWAY = 60.0
# Platform tokens are 1-2 KB; a password longer than this is not one, and is not parsed.
MAX_TOKEN = 16384
# Signature checks with the asymmetric algorithms only; PyJWT's own list (with HS* and
# "none") is never consulted.
_JWS = jwt.PyJWS(algorithms=list(ALGORITHMS))
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


class OIDCVerifier:
    """Verifies one issuer's tokens: ``await verify(token)`` is the principal's claim."""

    def __init__(
        self,
        config: OIDCConfig,
        *,
        reactor: IReactorTime,
        http: Any = None,
        leeway: float = DEFAULT_LEEWAY,
    ) -> None:
        if not config.issuer.startswith("https://"):
            raise ValueError(f"OIDC issuer {config.issuer!r} must be an https URL")
        self.config = config
        self._clock = reactor
        self._leeway = leeway
        if http is None:
            http = make_client(reactor, pool=make_pool(reactor), ca_file=config.ca)
        self._keys = IssuerKeys(config.issuer, get=http.get, clock=reactor)

    async def verify(self, token: str) -> str:
        """The value of the configured ``username_claim`` of a token that checks out;
        :class:`OIDCRefused` otherwise."""
        alg, kid = _header(token)
        keys = await self._keys.key_set(kid)
        key = keys.for_token(kid, alg)
        if key is None:
            if kid is None:
                raise OIDCRefused("the token names no key (kid) and the issuer has several")
            if keys.knows(kid):
                raise OIDCRefused(f"the issuer's key {shown(kid)} is not for {alg}")
            raise OIDCRefused(f"no key {shown(kid)} at the issuer")
        return self._claims(_payload(token, key, alg))

    def _claims(self, claims: dict[str, Any]) -> str:
        config = self.config
        if claims.get("iss") != config.issuer:
            raise OIDCRefused("wrong issuer (iss)")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if config.audience not in audiences:
            raise OIDCRefused("wrong audience (aud)")
        now = self._clock.seconds()
        expires = _time(claims, "exp")
        if expires is None:
            raise OIDCRefused("no expiry (exp)")
        if now >= expires + self._leeway:
            raise OIDCRefused("expired (exp)")
        not_before = _time(claims, "nbf")
        if not_before is not None and now + self._leeway < not_before:
            raise OIDCRefused("not valid yet (nbf)")
        issued = _time(claims, "iat")
        if issued is not None and now + self._leeway < issued:
            raise OIDCRefused("issued in the future (iat)")
        value = claims.get(config.username_claim)
        if not isinstance(value, str) or not value:
            raise OIDCRefused(f"no string claim {config.username_claim!r}")
        return value


def _header(token: str) -> tuple[str, str | None]:
    """The token's ``alg`` (an accepted one) and ``kid``, before any key is looked up."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN or token.count(".") != 2:
        raise OIDCRefused("not a JWT")
    if not all(_canonical(segment) for segment in token.split(".")):
        # One token, one spelling: padding, stray characters and unused low bits would
        # give a token other spellings that verify alike (PyJWT accepts '=' padding).
        raise OIDCRefused("not a JWT (not canonical base64url)")
    try:
        header = _JWS.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise OIDCRefused("not a JWT (malformed header)") from None
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise OIDCRefused(f"algorithm {shown(alg)} not accepted")
    if kid is not None and not isinstance(kid, str):
        raise OIDCRefused("the key id (kid) is not a string")
    if "crit" in header:
        # RFC 7515 4.1.11: extensions marked critical must be understood; none are.
        raise OIDCRefused("critical header extensions are not supported")
    return alg, kid


def _canonical(segment: str) -> bool:
    if _BASE64URL.fullmatch(segment) is None:
        return False
    try:
        decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except ValueError:
        return False
    return base64.urlsafe_b64encode(decoded).rstrip(b"=").decode("ascii") == segment


def _payload(token: str, key: Key, alg: str) -> dict[str, Any]:
    """The claims of a token whose signature ``key`` verifies with ``alg``."""
    try:
        decoded = _JWS.decode_complete(token, key=key.public_key, algorithms=[alg])
    except jwt.InvalidSignatureError:
        raise OIDCRefused("bad signature") from None
    except (jwt.InvalidTokenError, ValueError, TypeError):
        raise OIDCRefused("not a JWT (malformed)") from None
    try:
        claims = json.loads(decoded["payload"])
    except ValueError:
        raise OIDCRefused("the claims are not JSON") from None
    if not isinstance(claims, dict):
        raise OIDCRefused("the claims are not a JSON object")
    return claims


def _time(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 2), None when absent; anything else is refused."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OIDCRefused(f"{name} is not a number")
    return float(value)


def oidc_verifiers(
    configs: Sequence[OIDCConfig], reactor: Any, *, pool: UpstreamPool | None = None
) -> dict[str, OIDCVerifier]:
    """A verifier per ``[[auth.oidc]]`` provider, by name, each over HTTPS trusting the
    platform's CAs plus the provider's ``ca`` (the upstreams' TLS client and trust).

    ``pool`` holds their connections; the wiring passes the one it closes at shutdown.
    """
    pool = pool if pool is not None else make_pool(reactor)
    return {
        config.name: OIDCVerifier(
            config, reactor=reactor, http=make_client(reactor, pool=pool, ca_file=config.ca)
        )
        for config in configs
    }
