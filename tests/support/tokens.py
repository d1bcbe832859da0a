"""A small Docker token-auth server (GET and OAuth2 POST /token) signing RS256 JWTs.

Implements https://distribution.github.io/distribution/spec/auth/token/ and the OAuth2 variant
well enough for the CNCF distribution registry (2.8) to verify the tokens it issues.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .tls import TLSFiles, self_signed_rsa

REPO_ACTIONS = frozenset({"pull", "push"})


def libtrust_key_id(public_key: Any) -> str:
    """The libtrust fingerprint distribution uses as JWT ``kid``.

    base32 of the first 240 bits of SHA-256 over the DER SubjectPublicKeyInfo, in 12 groups of 4
    characters joined by ``:``.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(der).digest()[:30]
    encoded = base64.b32encode(digest).decode("ascii").rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, 48, 4))


@dataclass(frozen=True)
class Scope:
    """One ``type:name:actions`` scope; *name* may contain ``host:port``."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope:
        first = text.find(":")
        last = text.rfind(":")
        if first < 0 or last == first:
            raise ValueError(f"malformed scope {text!r}")
        actions = tuple(a for a in text[last + 1 :].split(",") if a)
        return cls(type=text[:first], name=text[first + 1 : last], actions=actions)

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


@dataclass
class RecordedRequest:
    """What the issuer saw: one entry per HTTP request, including refused ones."""

    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    user: str | None  # authenticated (or claimed) user name, None for anonymous
    headers: dict[str, str]
    status: int = 0
    granted: list[dict[str, Any]] = field(default_factory=list)

    @property
    def scopes(self) -> list[str]:
        """Requested scopes, from the query (GET) or the space-separated form field (POST)."""
        out = list(self.query.get("scope", []))
        for value in self.form.get("scope", []):
            out.extend(s for s in value.split(" ") if s)
        return out

    @property
    def service(self) -> str | None:
        values = self.query.get("service") or self.form.get("service")
        return values[0] if values else None


class _AuthError(Exception):
    pass


class TokenIssuer:
    """Threaded HTTP token server on 127.0.0.1; use as a context manager or call start()/stop().

    Policy: ``users`` (name -> password) may pull and push any repository and list the catalog,
    except those named in ``repositories`` (name -> repository names), who may pull and push
    only those; anonymous requests get ``pull`` on repositories when ``anonymous_pull`` is
    true, nothing otherwise. A scope the policy does not grant gets a token without its
    actions, as distribution's own token servers answer. Wrong credentials give 401. Every
    request is appended to ``requests``.
    """

    def __init__(
        self,
        directory: Path | str,
        users: dict[str, str] | None = None,
        anonymous_pull: bool = True,
        service: str = "test-registry",
        issuer: str = "regproxy-test-issuer",
        expires_in: int = 300,
        header_mode: str = "kid",
        tls: TLSFiles | None = None,
        repositories: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        self.tls = tls
        self.repositories = {
            user: frozenset(names) for user, names in (repositories or {}).items()
        }
        if header_mode not in ("kid", "x5c"):
            raise ValueError("header_mode must be 'kid' or 'x5c'")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.users: dict[str, str] = dict(users or {})
        self.anonymous_pull = anonymous_pull
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.header_mode = header_mode
        self.requests: list[RecordedRequest] = []
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> user
        self._lock = threading.Lock()
        key, cert = self_signed_rsa("regproxy test token signer")
        self._key: rsa.RSAPrivateKey = key
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.kid = libtrust_key_id(key.public_key())
        self.cert_path = self.directory / "token-signer.crt"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "TokenIssuer not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def start(self) -> TokenIssuer:
        issuer = self

        class Handler(_Handler):
            owner = issuer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls.cert, self.tls.key)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="token-issuer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> TokenIssuer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- inspection ----------------------------------------------------------------------------

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def requested_scopes(self) -> list[str]:
        with self._lock:
            return [s for r in self.requests for s in r.scopes]

    # -- policy and signing ----------------------------------------------------------------------

    def grant(self, user: str | None, scopes: Iterable[str]) -> list[dict[str, Any]]:
        """The access claim for *user* (None: anonymous) asking for *scopes*."""
        access: list[dict[str, Any]] = []
        for text in scopes:
            try:
                scope = Scope.parse(text)
            except ValueError:
                continue
            if scope.type == "repository":
                allowed = (
                    REPO_ACTIONS
                    if user is not None
                    else ({"pull"} if self.anonymous_pull else set())
                )
                if user in self.repositories and scope.name not in self.repositories[user]:
                    allowed = set()
                actions = [a for a in scope.actions if a in allowed]
            elif scope.type == "registry" and scope.name == "catalog" and user is not None:
                actions = [a for a in scope.actions if a == "*"]
            else:
                actions = []
            access.append({"type": scope.type, "name": scope.name, "actions": actions})
        return access

    def sign(
        self,
        subject: str,
        access: list[dict[str, Any]],
        audience: str | None = None,
        expires_in: int | None = None,
    ) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience or self.service,  # distribution 2.8 wants a string, not a list
            "exp": now + (expires_in if expires_in is not None else self.expires_in),
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        headers: dict[str, Any] = {"typ": "JWT"}
        if self.header_mode == "kid":
            headers["kid"] = self.kid
        else:
            headers["x5c"] = [base64.b64encode(self._cert_der).decode("ascii")]
        return jwt.encode(claims, self._key, algorithm="RS256", headers=headers)

    def _authenticate(self, username: str | None, password: str | None) -> str | None:
        if username is None:
            return None
        if self.users.get(username) != password or password is None:
            raise _AuthError(username)
        return username


class _Handler(BaseHTTPRequestHandler):
    owner: TokenIssuer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _basic_user(self) -> tuple[str | None, str | None]:
        header = self.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            return None, None
        try:
            raw = base64.b64decode(header[6:].strip()).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return "", None
        user, _, password = raw.partition(":")
        return user, password

    def _send_json(
        self, status: int, body: dict[str, Any], extra: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _record(self, form: dict[str, list[str]], user: str | None) -> RecordedRequest:
        parts = urlsplit(self.path)
        record = RecordedRequest(
            method=self.command,
            path=parts.path,
            query=parse_qs(parts.query, keep_blank_values=True),
            form=form,
            user=user,
            headers={k: v for k, v in self.headers.items()},
        )
        with self.owner._lock:
            self.owner.requests.append(record)
        return record

    def _issue(self, record: RecordedRequest, user: str | None, offline: bool) -> None:
        owner = self.owner
        access = owner.grant(user, record.scopes)
        record.granted = access
        service = record.service or owner.service
        token = owner.sign(user or "", access, audience=service)
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": owner.expires_in,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if offline and user is not None:
            refresh = secrets.token_urlsafe(24)
            with owner._lock:
                owner.refresh_tokens[refresh] = user
            body["refresh_token"] = refresh
        record.status = 200
        self._send_json(200, body)

    def _deny(self, record: RecordedRequest, status: int, message: str) -> None:
        record.status = status
        extra = {"WWW-Authenticate": 'Basic realm="token"'} if status == 401 else None
        self._send_json(status, {"errors": [{"code": "UNAUTHORIZED", "message": message}]}, extra)

    def do_GET(self) -> None:
        username, password = self._basic_user()
        record = self._record({}, username)
        if urlsplit(self.path).path != "/token":
            self._deny(record, 404, "not found")
            return
        try:
            user = self.owner._authenticate(username, password)
        except _AuthError:
            self._deny(record, 401, "invalid credentials")
            return
        offline = record.query.get("offline_token", ["false"])[0] == "true"
        self._issue(record, user, offline)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode("utf-8") if length else ""
        form = parse_qs(raw, keep_blank_values=True)
        grant_type = (form.get("grant_type") or [""])[0]
        username = (form.get("username") or [None])[0]
        record = self._record(form, username)
        if urlsplit(self.path).path != "/token":
            self._deny(record, 404, "not found")
            return
        if grant_type == "password":
            password = (form.get("password") or [None])[0]
            try:
                user = self.owner._authenticate(username, password)
            except _AuthError:
                self._deny(record, 401, "invalid credentials")
                return
        elif grant_type == "refresh_token":
            refresh = (form.get("refresh_token") or [""])[0]
            with self.owner._lock:
                found = self.owner.refresh_tokens.get(refresh)
            if found is None:
                self._deny(record, 401, "invalid refresh token")
                return
            user = record.user = found
        else:
            self._deny(record, 400, f"unsupported grant_type {grant_type!r}")
            return
        offline = (form.get("access_type") or [""])[0] == "offline"
        self._issue(record, user, offline or grant_type == "password")
