"""Whether a ``/v2/`` request may be answered, decided on every request.

The Bearer token is checked (signature once, then remembered; expiry, audience and the
scope for this repository every time) and so are the rules in force: a reload that
removes a rule, a user or a group member closes the tokens already issued.

What a refused client sees:

- no credentials, or a token that is not valid: ``401 UNAUTHORIZED`` with the challenge
  (``scope`` named, so clients ask for the token they need);
- a valid token without this repository's scope, for a repository the rules admit:
  ``401`` with ``error="insufficient_scope"`` (the client fetches a token for it);
- credentials whose principal the rules do not admit: ``403 DENIED``. The decision is
  the rules' alone, made before anything is asked upstream, so it says nothing of
  whether the repository exists; ``404 NAME_UNKNOWN`` stays the answer of routes and
  allow-lists, for everyone alike.
"""

from __future__ import annotations

import attrs

from ..config import Route
from ..protocol.challenge import quote
from ..protocol.errors import OCIError
from .gate import Client, Gate
from .rules import ANONYMOUS
from .tokens import InvalidToken

PLAIN_HTTP = (
    "credentials over plain HTTP are refused: serve https (--port ssl:... or a TLS proxy in "
    "front, named with --trusted-proxy and sending X-Forwarded-Proto), or start with "
    "--insecure-auth"
)


@attrs.frozen
class Denied(OCIError):
    """``403 DENIED``: credentials the rules do not admit. ``principal`` names them for the
    access log (who was refused what), never for the client."""

    principal: str = attrs.field(default="", eq=False)


@attrs.frozen
class Admitted:
    """Who is asking; ``principal`` is "" for anonymous."""

    principal: str


def challenge(realm: str, service: str, scope: str | None, error: str | None = None) -> bytes:
    value = f"Bearer realm={quote(realm)},service={quote(service)}"
    if scope:
        value += f",scope={quote(scope)}"
    if error:
        value += f",error={quote(error)}"
    return value.encode("utf-8")


def refusal(
    realm: str, service: str, scope: str | None, message: str, error: str | None = None
) -> OCIError:
    return OCIError(
        "UNAUTHORIZED",
        message,
        headers=((b"www-authenticate", challenge(realm, service, scope, error)),),
    )


def admit(
    gate: Gate,
    *,
    route: Route | None,
    name: str,
    client_name: str,
    authorization: bytes | None,
    client: Client,
    realm: str,
    service: str,
) -> Admitted:
    """Admit the request or raise the OCIError to answer.

    ``route`` is None for the top of ``/v2/`` (the ping), ``name`` the repository within
    the route and ``client_name`` as the client named it ("" for the ping and the catalog).
    """
    scope = f"repository:{client_name}:pull" if client_name else None
    if not gate.authenticates:
        return Admitted(ANONYMOUS)
    principal, scopes = _principal(gate, authorization, client, realm, service, scope)
    if route is None:
        if principal is None:
            raise refusal(realm, service, None, "authentication required")
        return Admitted(principal)
    if not client_name:
        # The catalog would list every repository of the upstream, whatever the rules say.
        raise OCIError("DENIED", "the catalog is not served with access control")
    if gate.admits(route, principal or ANONYMOUS, name):
        if principal is None:
            return Admitted(ANONYMOUS)
        if scopes is not None and client_name in scopes:
            return Admitted(principal)
        if gate.admits(route, ANONYMOUS, name):
            # Anybody may: the token only says who is asking (for the rate limits).
            return Admitted(principal)
        raise refusal(realm, service, scope, "token lacks this repository", "insufficient_scope")
    if principal is None or principal == ANONYMOUS:
        raise refusal(realm, service, scope, "authentication required")
    raise Denied(
        "DENIED",
        "access to this repository is denied",
        {"name": client_name[:300]},
        principal=principal,
    )


def _principal(
    gate: Gate,
    authorization: bytes | None,
    client: Client,
    realm: str,
    service: str,
    scope: str | None,
) -> tuple[str | None, frozenset[str] | None]:
    """(principal, the token's repositories); (None, None) without credentials."""
    if not authorization:
        return None, None
    kind, _, value = authorization.partition(b" ")
    if kind.lower() != b"bearer":
        # Only the proxy's tokens open /v2/: Basic goes to the token realm.
        raise refusal(realm, service, scope, "use a token from the realm")
    try:
        grant = gate.verifier.grant(value.strip().decode("ascii"), service)
    except (InvalidToken, UnicodeDecodeError):
        gate.count("invalid_token")
        raise refusal(realm, service, scope, "invalid token", "invalid_token") from None
    if not gate.known(grant.subject):
        gate.count("invalid_token")
        raise refusal(realm, service, scope, "invalid token", "invalid_token")
    if grant.subject != ANONYMOUS and not (client.secure or gate.insecure):
        gate.count("plain_http")
        raise OCIError("DENIED", PLAIN_HTTP)
    return grant.subject, grant.repositories
