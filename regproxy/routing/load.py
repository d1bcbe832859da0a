"""Routes from a TOML file (``--config FILE``): read, check every key, report every error.

Each table's keys are declared once, in a key table (``ROUTE_KEYS`` for ``[[routes]]``):
the TOML type of each and the function that checks and converts its value. A key that a
flag also sets is read with the flag's own function (``routing.values``), so the file
refuses what the flag refuses, in the same words. ``read_table`` checks any table against
its key table and reports every problem, unknown keys beside the others; a new key (or a
new section, with a key table of its own) is a line in a table.

Loading does all its file reading here, once: secrets (password and header files) are
read into the frozen ``Credentials``, so a request never touches the disk for them and a
file that is missing or unreadable is found at start-up (or at a reload), not at the
first pull. Errors name the route and the key, never a secret; they never name the routes
file itself, which the caller does once (``--check``, a reload's log line).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ..config import BlobRedirects, ConfigError, Credentials, Route
from ..protocol.reference import NAME_RE
from . import values
from .load_access import AccessTables
from .matching import RouteTable, conflicts

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROUTE_NAME_RE = re.compile(r"[a-z0-9-]+")
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
HOST_RE = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
# containerd sends the registry host, with a port when it has one: localhost:5000.
NAMESPACE_RE = re.compile(r"[a-z0-9][a-z0-9.-]*(?::[0-9]+)?")
GLOB_RE = re.compile(r"[a-z0-9._/*-]+")


@attrs.frozen
class Key:
    """What one key of a table takes.

    ``kind`` is its TOML type; ``coerce`` checks and converts a value of that type, raising
    ``ValueError`` with a sentence that says what to give instead (for a key that a flag
    also sets, the flag's own function); ``required`` is the error when the key is missing;
    ``path``: the value names a file, relative to the routes file, and ``coerce`` gets
    that path.
    """

    kind: type
    coerce: Callable[[Any], Any] | None = None
    required: str | None = None
    path: bool = False


def route_name(text: str) -> str:
    if not ROUTE_NAME_RE.fullmatch(text):
        raise ValueError(
            f'{_q(text)} is not a valid route name (lower-case letters, digits and "-")'
        )
    return text


def host_pattern(text: str) -> str:
    host = text.lower()
    if ":" in host:
        raise ValueError(f"{_q(text)}: give the host name without a port (ports are ignored)")
    if not HOST_RE.fullmatch(host):
        raise ValueError(f"{_q(text)} is not a host name (or a pattern such as *.example.com)")
    return host


def path_component(text: str) -> str:
    if "/" in text or not NAME_RE.fullmatch(text):
        raise ValueError(f"{_q(text)} is not one repository name component (such as hub or ghcr)")
    return text


def namespace(text: str) -> str:
    if not NAMESPACE_RE.fullmatch(text.lower()):
        raise ValueError(f"{_q(text)} is not a registry host name such as docker.io")
    return text.lower()


def repository_patterns(patterns: list[Any]) -> tuple[str, ...]:
    if not patterns:
        raise ValueError("list at least one pattern, or leave allow out")
    if not all(isinstance(pattern, str) for pattern in patterns):
        raise ValueError("give a list of strings")
    problems = [f"{_q(p)}: {problem}" for p in patterns if (problem := _glob_problem(p))]
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(patterns)


def _glob_problem(pattern: str) -> str | None:
    if not GLOB_RE.fullmatch(pattern) or "***" in pattern:
        return "use repository name characters with * (one component) and ** (any depth)"
    if pattern.startswith("/") or pattern.endswith("/") or "//" in pattern:
        return "no leading, trailing or double slashes"
    return None


def not_empty(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


def secret(path: str) -> str:
    """A secret's file, read now; the value never appears in an error."""
    value = _read_text(path).strip()
    if not value:
        raise ValueError(f"{_q(path)} is empty")
    return value


# Every key a [[routes]] table may have; the documentation names each one.
ROUTE_KEYS: dict[str, Key] = {
    "name": Key(str, route_name, required="name is required"),
    "upstream": Key(
        str,
        values.upstream_name,
        required="upstream is required (a URL, a host name or a known name: docker.io, ...)",
    ),
    "repo_prefix": Key(str, values.repository_prefix),
    "host": Key(str, host_pattern),
    "path": Key(str, path_component),
    "namespace": Key(str, namespace),
    "allow": Key(list, repository_patterns),
    "upstream_ca": Key(str, values.readable_file, path=True),
    "blob_redirects": Key(str, values.blob_redirects),
    "cache": Key(bool),
    "username": Key(str, not_empty),
    "password_file": Key(str, secret, path=True),
    "auth_header_file": Key(str, secret, path=True),
    "google_credentials": Key(str, values.readable_file, path=True),
    "google_json_key": Key(bool),
    "google_adc": Key(bool),
    # Who may pull (with [auth]); load_access reads these two.
    "pull": Key(list),
    "access": Key(list),
}
TOP_LEVEL_KEYS = ("routes", "auth", "limits", "cache_store")
# The kinds of upstream credentials and the keys of each: a route chooses one kind.
CREDENTIAL_KINDS = (
    ("username + password_file", ("username", "password_file")),
    ("auth_header_file", ("auth_header_file",)),
    ("google_credentials", ("google_credentials", "google_json_key")),
    ("google_adc", ("google_adc",)),
)


def load_routes(path: str | os.PathLike[str]) -> RouteTable:
    """The routes of a TOML file; ConfigError lists every problem when it has any."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigError([f"cannot read the file: {error.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(["not UTF-8 text"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"not valid TOML: {error}"]) from None
    return parse_routes(data, base=os.path.dirname(os.path.abspath(path)))


def check_config(path: str | os.PathLike[str]) -> list[str]:
    """The errors of a TOML route file, empty when it is valid (``--check``)."""
    try:
        load_routes(path)
    except ConfigError as error:
        return error.errors
    return []


def parse_routes(data: Mapping[str, Any], base: str = ".") -> RouteTable:
    """Routes from parsed TOML; relative file names are relative to ``base``."""
    errors: list[str] = []
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            errors.append(f"unknown top-level key {_q(key)}{_suggest(key, TOP_LEVEL_KEYS)}")
    tables = data.get("routes", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        errors.append("routes must be [[routes]] tables")
        raise ConfigError(errors)
    errors.extend(_duplicate_names(tables))
    access = AccessTables(data, base)
    store = _cache_store(data.get("cache_store"), errors)
    routes, numbers = [], []
    for number, table in enumerate(tables, 1):
        name = table.get("name")
        label = f"route {_q(name)}" if isinstance(name, str) else f"route #{number}"
        route_errors: list[str] = []
        read = read_table(table, ROUTE_KEYS, base=base, errors=route_errors)
        route_errors.extend(_credential_errors(table))
        errors.extend(f"{label}: {error}" for error in route_errors)
        rules = access.route_access(table, label, _glob_problem)
        if not route_errors:
            routes.append(attrs.evolve(_route(read), access=rules))
            numbers.append(number)
    errors.extend(access.errors)
    if errors:
        # Report conflicts among the routes that are right too: one run shows everything.
        raise ConfigError(list(dict.fromkeys(errors + conflicts(routes, numbers))))
    return RouteTable(tuple(routes), auth=access.auth, limits=access.limits, cache_store=store)


def _cache_store(value: Any, errors: list[str]) -> str | None:
    """The top-level ``cache_store``, checked as ``--cache-store`` is."""
    if value is None:
        return None
    if not isinstance(value, str):
        errors.append("cache_store must be a string")
        return None
    try:
        return values.store_location(value)
    except ValueError as error:
        errors.append(f"cache_store: {error}")
        return None


def read_table(
    table: Mapping[str, Any], keys: Mapping[str, Key], *, base: str, errors: list[str]
) -> dict[str, Any]:
    """The values of ``table`` that are right, converted; an entry in ``errors`` for each
    problem (an unknown key, a missing one, a wrong type, a value its function refuses),
    all of them: none hides another."""
    known = tuple(keys)
    for key in table:
        if key not in keys:
            errors.append(f"unknown key {_q(key)}{_suggest(key, known)}")
    read: dict[str, Any] = {}
    for key, spec in keys.items():
        value: Any = table.get(key)
        if value is None:
            if spec.required:
                errors.append(spec.required)
            continue
        # bool is an int in Python, and "cache = 1" is no boolean in TOML.
        if not isinstance(value, spec.kind) or (spec.kind is not bool and isinstance(value, bool)):
            errors.append(f"{key} must be {_KIND_NAMES[spec.kind]}")
            continue
        if spec.path:
            name = str(value)
            if not name.strip():
                errors.append(f"{key}: must not be empty")
                continue
            value = os.path.join(base, os.path.expanduser(name))
        try:
            read[key] = spec.coerce(value) if spec.coerce is not None else value
        except ValueError as error:
            errors.append(f"{key}: {error}")
    return read


def _credential_errors(table: Mapping[str, Any]) -> list[str]:
    """How a route's credential keys go together (each key's own value is read_table's)."""
    errors = []
    kinds = [kind for kind, keys in CREDENTIAL_KINDS if any(key in table for key in keys)]
    if len(kinds) > 1:
        errors.append(f"choose one kind of credentials, not {' and '.join(kinds)}")
    if ("username" in table) != ("password_file" in table):
        errors.append("username and password_file go together")
    if "google_json_key" in table and "google_credentials" not in table:
        errors.append("google_json_key needs google_credentials")
    return errors


def _route(read: Mapping[str, Any]) -> Route:
    """The route of a table that read_table found right."""
    redirects = read.get("blob_redirects")
    return Route(
        upstream=read["upstream"],
        prefix=read.get("repo_prefix") or "",
        credentials=Credentials(
            auth_header=read.get("auth_header_file"),
            username=read.get("username"),
            password=read.get("password_file"),
            google_key_file=read.get("google_credentials"),
            google_adc=bool(read.get("google_adc")),
            google_json_key=bool(read.get("google_json_key")),
        ),
        blob_redirects=redirects if redirects is not None else BlobRedirects.PASS,
        upstream_ca=read.get("upstream_ca"),
        name=read["name"],
        host=read.get("host"),
        path=read.get("path"),
        namespace=read.get("namespace"),
        allow=read.get("allow", ()),
        cache=read.get("cache", True),
    )


def _duplicate_names(tables: list[dict[str, Any]]) -> list[str]:
    """Found on the raw tables, so a name used twice is reported even if a route is wrong."""
    first: dict[str, int] = {}
    errors = []
    for number, table in enumerate(tables, 1):
        name = table.get("name")
        if isinstance(name, str):
            if name in first:
                errors.append(f"routes #{first[name]} and #{number} are both named {_q(name)}")
            first.setdefault(name, number)
    return errors


def _suggest(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {_q(close[0])}?)" if close else ""


def _q(text: str) -> str:
    """Quote a value for an error message, escaped so odd characters stay visible."""
    return json.dumps(text)


def _read_text(path: str | os.PathLike[str]) -> str:
    """A file's text; ValueError says why it cannot be had (and never shows the content)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as error:
        raise ValueError(f"cannot read {_q(str(path))}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{_q(str(path))} is not UTF-8 text") from None


_KIND_NAMES: dict[type, str] = {
    str: "a string",
    bool: "true or false",
    list: "a list",
}
