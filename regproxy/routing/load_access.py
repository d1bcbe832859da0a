"""``[auth]``, ``[limits]`` and each route's ``pull`` / ``[[routes.access]]`` from the routes
file (and ``--htpasswd``): read, checked, every error naming its table and key.

The htpasswd file and the token key are read here, when the configuration loads (at
start-up, ``--check`` or a reload), so a request never touches the disk for them and a bad
file is refused before it is in force. Errors name the file and the line, never a hash,
a password or a key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ..config import AccessRule, AuthConfig, LimitsConfig, OIDCConfig, RateLimit

AUTH_KEYS = ("htpasswd", "token_key", "token_ttl", "groups", "oidc")
OIDC_KEYS = ("name", "issuer", "audience", "username_claim", "ca")
LIMITS_KEYS = ("anonymous", "users", "redis")
ACCESS_KEYS = ("repos", "pull")
# The bcrypt variants (Apache writes $2y$, OpenBSD and Python $2b$, old ones $2a$).
BCRYPT_RE = re.compile(rb"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
# htpasswd user names: no colon (the separator) and nothing a principal means otherwise.
USER_RE = re.compile(r"[^:@\s][^:\s]*")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
RESERVED = frozenset({"anonymous", "users"})
MAX_TOKEN_TTL = 86400.0


def _q(text: str) -> str:
    return json.dumps(text)


def read_htpasswd(path: str) -> dict[str, bytes]:
    """User name -> bcrypt hash; ValueError naming the line of the first bad entry."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ValueError(f"cannot read {_q(path)}: {error.strerror}") from None
    users: dict[str, bytes] = {}
    for number, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        name_bytes, colon, hashed = line.partition(b":")
        where = f"{_q(path)} line {number}"
        try:
            name = name_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{where}: the user name is not UTF-8") from None
        if not colon or not USER_RE.fullmatch(name) or name in RESERVED:
            raise ValueError(f"{where}: not a user:hash line, or a reserved user name")
        if not BCRYPT_RE.fullmatch(hashed):
            # The kind only: a hash is a secret too.
            kind = "an MD5 (apr1)" if hashed.startswith(b"$apr1$") else "a non-bcrypt"
            raise ValueError(
                f"{where}: user {_q(name)} has {kind} entry; only bcrypt is accepted (htpasswd -B)"
            )
        if name in users:
            raise ValueError(f"{where}: user {_q(name)} appears twice")
        users[name] = hashed
    return users


def read_token_key(path: str) -> bytes:
    """The PEM of an EC P-256 private key; ValueError says why not (never the key)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        with open(path, "rb") as handle:
            pem = handle.read()
    except OSError as error:
        raise ValueError(f"cannot read {_q(path)}: {error.strerror}") from None
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{_q(path)} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(
            f"{_q(path)} is not an EC P-256 key (openssl ecparam -name prime256v1 -genkey)"
        )
    return pem


class AccessTables:
    """The access parts of one routes file; ``errors`` collects every problem found."""

    def __init__(self, data: Mapping[str, Any], base: str) -> None:
        self.base = base
        self.errors: list[str] = []
        self.auth = self._auth(data.get("auth"))
        self.limits = self._limits(data.get("limits"))

    # -- [auth] ------------------------------------------------------------------------

    def _auth(self, table: Any) -> AuthConfig | None:
        if table is None:
            return None
        if not isinstance(table, dict):
            self.errors.append("auth must be a table: [auth]")
            return None
        errors = self.errors
        for key in table:
            if key not in AUTH_KEYS:
                errors.append(f"auth: unknown key {_q(key)}")
        users: dict[str, bytes] = {}
        htpasswd = self._file(table, "htpasswd", "auth")
        if htpasswd is not None:
            try:
                users = read_htpasswd(htpasswd)
            except ValueError as error:
                errors.append(f"auth: htpasswd: {error}")
        pem = None
        token_key = self._file(table, "token_key", "auth")
        if token_key is not None:
            try:
                pem = read_token_key(token_key)
            except ValueError as error:
                errors.append(f"auth: token_key: {error}")
        ttl = table.get("token_ttl", 300)
        if (
            isinstance(ttl, bool)
            or not isinstance(ttl, (int, float))
            or not 0 < ttl <= MAX_TOKEN_TTL
        ):
            errors.append(f"auth: token_ttl must be a number of seconds, 1 to {MAX_TOKEN_TTL:g}")
            ttl = 300
        oidc = self._oidc(table.get("oidc", []))
        for issuer in oidc:
            if issuer.name in users:
                # Logging in with that name means the issuer's JWT: the user could not.
                errors.append(
                    f"auth.oidc {_q(issuer.name)}: the htpasswd file has a user of that name"
                )
        groups = self._groups(table.get("groups", {}), oidc)
        return AuthConfig(
            htpasswd=htpasswd,
            token_key=token_key,
            token_ttl=float(ttl),
            groups=groups,
            oidc=oidc,
            users=users,
            token_key_pem=pem,
        )

    def _file(self, table: Mapping[str, Any], key: str, label: str) -> str | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            self.errors.append(f"{label}: {key} must be a file name")
            return None
        return os.path.join(self.base, os.path.expanduser(value))

    def _groups(self, table: Any, oidc: tuple[OIDCConfig, ...]) -> dict[str, tuple[str, ...]]:
        if not isinstance(table, dict):
            self.errors.append('auth: groups must be a table: groups = { ops = ["alice"] }')
            return {}
        groups = {}
        for name, members in table.items():
            label = f"auth: groups.{name}"
            if not NAME_RE.fullmatch(name):
                self.errors.append(f"{label}: a group name is lower-case letters, digits, - and _")
            elif not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                self.errors.append(f"{label} must be a list of user names")
            else:
                groups[name] = tuple(members)
        return groups

    def _oidc(self, tables: Any) -> tuple[OIDCConfig, ...]:
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            self.errors.append("auth: oidc must be [[auth.oidc]] tables")
            return ()
        found: list[OIDCConfig] = []
        for number, table in enumerate(tables, 1):
            name = table.get("name")
            label = f"auth.oidc {_q(name)}" if isinstance(name, str) else f"auth.oidc #{number}"
            before = len(self.errors)
            for key in table:
                if key not in OIDC_KEYS:
                    self.errors.append(f"{label}: unknown key {_q(key)}")
            values = {}
            for key in ("name", "issuer", "audience", "username_claim"):
                value = table.get(key)
                if value is None and key == "username_claim":
                    value = "sub"
                if not isinstance(value, str) or not value:
                    self.errors.append(f"{label}: {key} is required (a string)")
                values[key] = value
            if isinstance(name, str) and not NAME_RE.fullmatch(name):
                self.errors.append(f"{label}: name is lower-case letters, digits, - and _")
            if isinstance(name, str) and any(o.name == name for o in found):
                self.errors.append(f"{label}: name used twice")
            issuer = values["issuer"]
            if isinstance(issuer, str) and not issuer.startswith("https://"):
                self.errors.append(f"{label}: issuer must be an https:// URL")
            ca = self._file(table, "ca", label)
            if ca is not None and not os.access(ca, os.R_OK):
                self.errors.append(f"{label}: ca: {_q(ca)} is not a readable file")
            if len(self.errors) == before:
                found.append(OIDCConfig(ca=ca, **values))
        return tuple(found)

    # -- [limits] ----------------------------------------------------------------------

    def _limits(self, table: Any) -> LimitsConfig | None:
        if table is None:
            return None
        if not isinstance(table, dict):
            self.errors.append("limits must be a table: [limits]")
            return None
        for key in table:
            if key not in LIMITS_KEYS:
                self.errors.append(f"limits: unknown key {_q(key)}")
        rates: dict[str, RateLimit | None] = {}
        for key in ("anonymous", "users"):
            value = table.get(key)
            rates[key] = None
            if value is None:
                continue
            try:
                if not isinstance(value, str):
                    raise ValueError('write COUNT/WINDOW as a string, like "100/6h"')
                rates[key] = RateLimit.parse(value)
            except ValueError as error:
                self.errors.append(f"limits: {key}: {error}")
        redis = table.get("redis")
        if redis is not None and (not isinstance(redis, str) or not redis.startswith("redis://")):
            self.errors.append("limits: redis must be a redis://host:port/db URL")
            redis = None
        return LimitsConfig(anonymous=rates["anonymous"], users=rates["users"], redis=redis)

    # -- a route's pull and [[routes.access]] --------------------------------------------

    def route_access(
        self,
        table: Mapping[str, Any],
        label: str,
        check_glob: Callable[[str], str | None],
    ) -> tuple[AccessRule, ...]:
        """A route's rules: its entries in order, then ``pull`` covering every repository."""
        entries = table.get("access")
        pull = table.get("pull")
        if entries is None and pull is None:
            return ()
        if self.auth is None:
            self.errors.append(f"{label}: pull and access need an [auth] table")
            return ()
        rules: list[AccessRule] = []
        if entries is not None:
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                self.errors.append(f"{label}: access must be [[routes.access]] tables")
                entries = []
            if entries == [] and pull is None:
                # No rules is the routes' default (users only), not the nobody it reads as.
                self.errors.append(
                    f"{label}: access is empty: give [[routes.access]] tables, or pull "
                    "(pull = [] for nobody)"
                )
            for number, entry in enumerate(entries, 1):
                rule = self._entry(entry, f"{label}: access #{number}", check_glob)
                if rule is not None:
                    rules.append(rule)
        if pull is not None:
            principals = self._principals(pull, f"{label}: pull")
            if principals is not None:
                rules.append(AccessRule(("**",), principals))
        return tuple(rules)

    def _entry(
        self, entry: Mapping[str, Any], label: str, check_glob: Callable[[str], str | None]
    ) -> AccessRule | None:
        for key in entry:
            if key not in ACCESS_KEYS:
                self.errors.append(f"{label}: unknown key {_q(key)}")
        repos = entry.get("repos")
        if not isinstance(repos, list) or not repos or not all(isinstance(r, str) for r in repos):
            self.errors.append(f'{label}: repos must be a list of patterns, like ["team-a/**"]')
            return None
        for pattern in repos:
            problem = check_glob(pattern)
            if problem:
                self.errors.append(f"{label}: repos {_q(pattern)}: {problem}")
                return None
        if "pull" not in entry:
            self.errors.append(f"{label}: pull is required (who may pull these; [] for nobody)")
            return None
        principals = self._principals(entry["pull"], f"{label}: pull")
        return None if principals is None else AccessRule(tuple(repos), principals)

    def _principals(self, value: Any, label: str) -> tuple[str, ...] | None:
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            self.errors.append(f"{label} must be a list of principals")
            return None
        before = len(self.errors)
        for principal in value:
            problem = self._principal_problem(principal)
            if problem:
                self.errors.append(f"{label}: {_q(principal)}: {problem}")
        return tuple(value) if len(self.errors) == before else None

    def _principal_problem(self, principal: str) -> str | None:
        assert self.auth is not None
        if principal in RESERVED:
            return None
        if principal.startswith("@"):
            if principal[1:] not in self.auth.groups:
                return f"no group {_q(principal[1:])} in [auth] groups"
            return None
        name, colon, subject = principal.partition(":")
        if colon:
            if name not in {issuer.name for issuer in self.auth.oidc}:
                return f"no [[auth.oidc]] named {_q(name)}"
            if not subject:
                return "give a subject pattern after the colon (* for any)"
            return None
        if not USER_RE.fullmatch(principal):
            return "not a user name, @group, anonymous, users, or <oidc name>:<subject>"
        return None


def access_options(options: Mapping[str, Any], from_file: AuthConfig | None) -> AuthConfig | None:
    """The access control of the command line: ``--htpasswd`` (single-upstream mode, every
    repository for ``users``) or the file's [auth], with ``--insecure-auth`` on either.
    ``options`` are the parsed options; ValueError says what is wrong, naming the option."""
    auth = from_file
    htpasswd: str | None = options["htpasswd"]
    if htpasswd is not None:
        try:
            auth = AuthConfig(htpasswd=htpasswd, users=read_htpasswd(htpasswd))
        except ValueError as error:
            raise ValueError(f"--htpasswd: {error}") from None
    if auth is None:
        if options["insecure-auth"]:
            raise ValueError("--insecure-auth goes with --htpasswd or an [auth] table")
        return None
    if options["workers"] > 1 and auth.token_key_pem is None:
        raise ValueError(
            "--workers with access control: every worker must sign with one key; give "
            "[auth] token_key = FILE (an EC P-256 key) in a routes file"
        )
    return attrs.evolve(auth, insecure=bool(options["insecure-auth"]))
