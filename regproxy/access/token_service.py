"""``/_token`` when the proxy is its own token service ([auth]).

Accepts what registry clients send: ``GET`` with Basic credentials or none (anonymous),
and the OAuth2 ``POST`` form with ``grant_type=password`` (``docker login``) or
``grant_type=refresh_token``. The user name of an ``[[auth.oidc]]`` issuer means the
password is that platform's JWT. The answer grants the pull scopes the rules admit for
the principal, and drops the others (never push); a wrong password and an unknown user
get the same answer in the same time.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
from collections.abc import Sequence

import attrs
from twisted.logger import Logger

from ..protocol.errors import OCIError
from ..protocol.reference import NAME_RE
from ..protocol.scope import Scope, split_scopes
from .admission import PLAIN_HTTP
from .gate import Client, Gate
from .rules import ANONYMOUS
from .tokens import InvalidToken, access_claims, refresh_claims

# How long a refresh token (docker login's identity token) lasts; each use re-checks the
# user and their password's mark, so a removed user or a changed password ends it sooner.
REFRESH_TTL = 30 * 86400.0

log = Logger(namespace="regproxy.access.tokens")


@attrs.frozen
class TokenAsk:
    """A token request, parsed; the secrets are never shown."""

    grant: str  # anonymous, password (Basic or the OAuth2 form) or refresh_token
    scopes: tuple[str, ...] = ()
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    refresh_token: str | None = attrs.field(default=None, repr=False)
    # Whether the client asked for a refresh token (offline_token / access_type=offline).
    offline: bool = False

    @property
    def has_credentials(self) -> bool:
        return self.grant != "anonymous"


def parse_ask(
    query: Sequence[tuple[str, str]],
    form: Sequence[tuple[str, str]] | None,
    authorization: bytes | None,
) -> TokenAsk:
    """What a GET or POST to ``/_token`` asks for; OCIError for a malformed request."""
    params = list(query) + list(form or ())
    scopes = tuple(split_scopes(v for k, v in params if k == "scope"))
    first: dict[str, str] = {}
    # A POST's grant and credentials come from its body only: a password in the URL would
    # end up in the logs of every proxy on the way.
    for key, value in form if form is not None else query:
        first.setdefault(key, value)
    if form is not None:
        grant = first.get("grant_type", "")
        offline = first.get("access_type") == "offline"
        if grant == "password":
            username, password = first.get("username", ""), first.get("password", "")
            if not username:
                raise OCIError("REQUEST_INVALID", "the password grant needs a username")
            return TokenAsk("password", scopes, username, password, offline=True)
        if grant == "refresh_token":
            refresh = first.get("refresh_token", "")
            if not refresh:
                raise OCIError("REQUEST_INVALID", "the refresh_token grant needs a refresh_token")
            return TokenAsk("refresh_token", scopes, refresh_token=refresh, offline=offline)
        raise OCIError("UNSUPPORTED", "grant_type must be password or refresh_token", status=400)
    offline = first.get("offline_token", "").lower() == "true"
    if authorization:
        kind, _, encoded = authorization.partition(b" ")
        if kind.lower() == b"basic":
            try:
                decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise OCIError("UNAUTHORIZED", "malformed Basic credentials") from None
            username, colon, password = decoded.partition(":")
            if not colon or not username:
                raise OCIError("UNAUTHORIZED", "malformed Basic credentials")
            return TokenAsk("password", scopes, username, password, offline=offline)
    return TokenAsk("anonymous", scopes)


def _issued_at(now: float) -> str:
    moment = datetime.datetime.fromtimestamp(int(now), datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.frozen
class Issued:
    principal: str
    body: bytes = attrs.field(repr=False)


async def issue(gate: Gate, ask: TokenAsk, *, client: Client, host: str, service: str) -> Issued:
    """The JSON answer for ``ask``; OCIError (401, 403 or 429) when it is refused."""
    if ask.has_credentials and not (client.secure or gate.insecure):
        gate.count("plain_http")
        raise OCIError("DENIED", PLAIN_HTTP)
    principal = await _authenticate(gate, ask, client, service)
    granted = []
    for text in ask.scopes:
        scope = Scope.parse(text)
        if not scope.is_repository or not {"pull", "*"} & set(scope.actions):
            continue
        if NAME_RE.fullmatch(scope.name) and gate.may_pull(principal, host, scope.name):
            granted.append(scope.name)
    now = gate.clock()
    token = gate.key.sign(
        access_claims(
            subject=principal,
            audience=service,
            repositories=granted,
            now=now,
            ttl=gate.token_ttl,
        )
    )
    answer: dict[str, object] = {
        "token": token,
        "access_token": token,
        "expires_in": int(gate.token_ttl),
        "issued_at": _issued_at(now),
    }
    if ask.offline and principal != ANONYMOUS and ":" not in principal:
        # Users only: a workload's JWT is short-lived by design, and so is its access.
        answer["refresh_token"] = gate.key.sign(
            refresh_claims(
                subject=principal,
                audience=service,
                mark=gate.users.mark(principal),
                now=now,
                ttl=REFRESH_TTL,
            )
        )
    return Issued(principal, json.dumps(answer).encode("utf-8"))


def _refused() -> OCIError:
    # One answer for a wrong password, an unknown user and a refused JWT.
    return OCIError("UNAUTHORIZED", "authentication failed")


async def _authenticate(gate: Gate, ask: TokenAsk, client: Client, service: str) -> str:
    if ask.grant == "anonymous":
        return ANONYMOUS
    if ask.grant == "refresh_token":
        assert ask.refresh_token is not None
        try:
            refresh = gate.verifier.refresh(ask.refresh_token, service)
        except InvalidToken as error:
            gate.count("failed")
            log.info("refresh token refused: {reason}", reason=error.reason)
            raise _refused() from None
        if refresh.subject not in gate.users or refresh.mark != gate.users.mark(refresh.subject):
            gate.count("failed")
            raise _refused()
        gate.count("ok")
        return refresh.subject
    assert ask.username is not None and ask.password is not None
    if not await gate.throttle.attempt(client.address):
        gate.count("throttled")
        wait = b"%d" % gate.throttle.retry_after(client.address)
        raise OCIError(
            "TOOMANYREQUESTS",
            "too many failed logins; try again later",
            headers=((b"retry-after", wait),),
        )
    try:
        principal = await _check_password(gate, ask.username, ask.password)
    except BaseException:
        # Also a check the client did not wait for: its guess is counted all the same.
        gate.throttle.failed(client.address)
        raise
    gate.throttle.succeeded(client.address)
    gate.count("ok")
    return principal


async def _check_password(gate: Gate, username: str, password: str) -> str:
    """The principal a password (or an OIDC issuer's JWT) proves; else the refusal."""
    issuer = gate.issuers.get(username)
    if issuer is not None:
        try:
            subject = await issuer.verify(password)
        except Exception as error:
            gate.count("failed")
            # The reason (expired, audience, unknown key ...), never the token.
            reason = getattr(error, "reason", type(error).__name__)
            log.info("{issuer} token refused: {reason}", issuer=username, reason=reason)
            raise _refused() from None
        return f"{username}:{subject}"
    if await gate.users.check(username, password):
        return username
    gate.count("failed")
    raise _refused()
