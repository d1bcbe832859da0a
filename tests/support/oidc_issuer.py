"""A workload-identity (OIDC) issuer for the tests: signing keys, tokens good and bad, and
an HTTPS server on 127.0.0.1 publishing its discovery document and JWKS.

:class:`TokenMint` is the pure part (keys, documents, tokens), used in memory by the unit
tests; :class:`OIDCIssuer` serves a mint's documents over HTTPS with the test CA
(tests/support/tls.py), counts the requests, and rotates keys while running. Tokens look
like the platforms' own: ``iss``, ``aud``, ``sub``, ``iat``, ``nbf``, ``exp`` and a
``kid`` header.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from .loopback import QuietHandler
from .tls import TLSFiles

DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/keys"
AUDIENCE = "r.example.com"
SUBJECT = "repo:acme/app:ref:refs/heads/main"
# The bad tokens :meth:`TokenMint.bad` makes, each refused for its own reason.
BAD_KINDS = (
    "expired",
    "wrong_audience",
    "wrong_issuer",
    "unknown_kid",
    "alg_none",
    "hs256_public_pem",
    "future_nbf",
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str  # RS256 or ES256
    private_key: Any

    @classmethod
    def generate(cls, alg: str = "RS256", kid: str | None = None) -> SigningKey:
        if alg == "RS256":
            key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES256":
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(f"unsupported test key algorithm {alg}")
        return cls(kid or f"{alg.lower()}-{secrets.token_hex(4)}", alg, key)

    @property
    def jwk(self) -> dict[str, Any]:
        """The public key as the issuer publishes it."""
        exporter = RSAAlgorithm if self.alg == "RS256" else ECAlgorithm
        public = exporter.to_jwk(self.private_key.public_key(), as_dict=True)
        return {**public, "kid": self.kid, "alg": self.alg, "use": "sig"}

    @property
    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class TokenMint:
    """An issuer's keys and the tokens it signs (no I/O)."""

    def __init__(self, issuer: str, *, algs: tuple[str, ...] = ("RS256", "ES256")) -> None:
        self.issuer = issuer
        self._lock = threading.Lock()
        self.keys: list[SigningKey] = [SigningKey.generate(alg) for alg in algs]

    # -- keys ------------------------------------------------------------------------------

    def add_key(self, alg: str = "RS256") -> SigningKey:
        """Publish a new key (first half of a rotation)."""
        key = SigningKey.generate(alg)
        with self._lock:
            self.keys.append(key)
        return key

    def retire_key(self, kid: str) -> None:
        """Stop publishing a key (second half of a rotation)."""
        with self._lock:
            self.keys = [key for key in self.keys if key.kid != kid]

    def key(self, alg: str = "RS256") -> SigningKey:
        """The newest published key of ``alg``."""
        with self._lock:
            return [key for key in self.keys if key.alg == alg][-1]

    # -- documents -------------------------------------------------------------------------

    def discovery(self, jwks_uri: str) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        }

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            return {"keys": [key.jwk for key in self.keys]}

    # -- tokens ----------------------------------------------------------------------------

    def claims(
        self, *, now: float | None = None, lifetime: float = 300.0, **overrides: Any
    ) -> dict[str, Any]:
        """The claims of a valid token; an override of None removes that claim."""
        now = time.time() if now is None else now
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": SUBJECT,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + lifetime),
        }
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def mint(
        self,
        *,
        key: SigningKey | None = None,
        alg: str = "RS256",
        headers: dict[str, Any] | None = None,
        now: float | None = None,
        lifetime: float = 300.0,
        **claims: Any,
    ) -> str:
        """A token signed by ``key`` (default: the newest published key of ``alg``)."""
        key = key or self.key(alg)
        return jwt.encode(
            self.claims(now=now, lifetime=lifetime, **claims),
            key.private_key,
            algorithm=key.alg,
            headers={"kid": key.kid, **(headers or {})},
        )

    def bad(self, kind: str, *, now: float | None = None) -> str:
        """A token that must be refused, for the reason ``kind`` (one of BAD_KINDS)."""
        now = time.time() if now is None else now
        if kind == "expired":
            return self.mint(now=now - 7200, lifetime=3600)
        if kind == "wrong_audience":
            return self.mint(now=now, aud="someone-else.example")
        if kind == "wrong_issuer":
            return self.mint(now=now, iss="https://evil.example")
        if kind == "unknown_kid":
            return self.mint(now=now, key=SigningKey.generate("RS256", kid="never-published"))
        if kind == "future_nbf":
            return self.mint(now=now, nbf=int(now + 3600), iat=int(now))
        key = self.key("RS256")
        if kind == "alg_none":
            header = {"alg": "none", "typ": "JWT", "kid": key.kid}
            return f"{b64json(header)}.{b64json(self.claims(now=now))}."
        if kind == "hs256_public_pem":
            # The classic confusion: HMAC with the issuer's public key as the secret, which
            # a verifier that let the token choose its algorithm would accept.
            header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
            signed = f"{b64json(header)}.{b64json(self.claims(now=now))}"
            mac = hmac.new(key.public_pem, signed.encode(), hashlib.sha256).digest()
            return f"{signed}.{b64url(mac)}"
        raise ValueError(f"unknown bad token kind {kind!r}")


class _Handler(QuietHandler):
    owner: OIDCIssuer

    def do_GET(self) -> None:
        issuer = self.owner
        path = self.path.split("?", 1)[0]
        with issuer.lock:
            issuer.requests[path] += 1
        if path == issuer.path + DISCOVERY_PATH:
            document = issuer.mint.discovery(issuer.jwks_uri)
            headers = {"Content-Type": "application/json"}
        elif path == issuer.path + JWKS_PATH:
            document = issuer.mint.jwks()
            headers = {"Content-Type": "application/json"}
            if issuer.cache_control is not None:
                headers["Cache-Control"] = issuer.cache_control
        else:
            self.answer(404, b"{}", {"Content-Type": "application/json"})
            return
        self.answer(200, json.dumps(document).encode(), headers)


class OIDCIssuer:
    """An HTTPS OIDC issuer on 127.0.0.1 (``with OIDCIssuer(tls) as issuer: ...``).

    ``requests`` counts the GETs by path (``discovery_count``, ``jwks_count``);
    ``cache_control`` is the JWKS response's Cache-Control (None: no header); rotate keys
    through ``mint`` while it runs.
    """

    def __init__(
        self, tls: TLSFiles, *, path: str = "", cache_control: str | None = "max-age=300"
    ) -> None:
        self.tls = tls
        self.path = path.rstrip("/")
        self.cache_control = cache_control
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        handler: Any = type("Handler", (_Handler,), {"owner": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert, tls.key)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_address[1])
        self.mint = TokenMint(self.issuer)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="oidc-issuer", daemon=True
        )

    @property
    def issuer(self) -> str:
        return f"https://127.0.0.1:{self.port}{self.path}"

    @property
    def jwks_uri(self) -> str:
        return self.issuer + JWKS_PATH

    def count(self, suffix: str) -> int:
        with self.lock:
            return self.requests[self.path + suffix]

    @property
    def discovery_count(self) -> int:
        return self.count(DISCOVERY_PATH)

    @property
    def jwks_count(self) -> int:
        return self.count(JWKS_PATH)

    def start(self) -> OIDCIssuer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    def __enter__(self) -> OIDCIssuer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
