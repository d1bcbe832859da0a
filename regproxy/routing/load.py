"""Routes from a TOML file (``--config FILE``): read, check every key, report every error.

Loading does all its file reading here, once: secrets (password and header files) are
read into the frozen ``Credentials``, so a request never touches the disk for them and a
file that is missing or unreadable is found at start-up (or at a reload), not at the
first pull. Errors name the route and the key, never a secret.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

from ..config import BlobRedirects, ConfigError, Credentials, Route, Upstream
from ..protocol.reference import NAME_RE
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

# Every key a [[routes]] table may have; README.rst documents each one.
ROUTE_KEYS = (
    "name",
    "upstream",
    "repo_prefix",
    "host",
    "path",
    "namespace",
    "allow",
    "upstream_ca",
    "blob_redirects",
    "cache",
    "username",
    "password_file",
    "auth_header_file",
    "google_credentials",
    "google_json_key",
    "google_adc",
)
TOP_LEVEL_KEYS = ("routes", "cache_store")


def load_routes(path: str | os.PathLike[str]) -> RouteTable:
    """The routes of a TOML file; ConfigError lists every problem when it has any."""
    try:
        text = _read_text(path)
    except ValueError as error:
        raise ConfigError([str(error)]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{path}: not valid TOML: {error}"]) from None
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
    routes, numbers = [], []
    for number, table in enumerate(tables, 1):
        parser = _RouteParser(table, number, base)
        route = parser.route()
        errors.extend(parser.errors)
        if route is not None:
            routes.append(route)
            numbers.append(number)
    if errors:
        # Report conflicts among the routes that are right too: one run shows everything.
        raise ConfigError(list(dict.fromkeys(errors + conflicts(routes, numbers))))
    store = data.get("cache_store")
    if store is not None and not (isinstance(store, str) and store.startswith("s3://")):
        raise ConfigError([f"cache_store must be a string s3://BUCKET/PREFIX, not {store!r}"])
    return RouteTable(tuple(routes), cache_store=store)


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


class _RouteParser:
    """One ``[[routes]]`` table; collects its errors rather than stopping at the first."""

    def __init__(self, table: Mapping[str, Any], number: int, base: str) -> None:
        self.table = table
        self.base = base
        self.errors: list[str] = []
        name = table.get("name")
        self.label = f"route {_q(name)}" if isinstance(name, str) else f"route #{number}"

    def error(self, message: str) -> None:
        self.errors.append(f"{self.label}: {message}")

    def get(self, key: str, kind: type, check: Callable[[Any], str | None] | None = None) -> Any:
        """The value of ``key`` when present and right, else None (and an error if wrong)."""
        value = self.table.get(key)
        if value is None:
            return None
        # bool is an int in Python, and "cache = 1" is no boolean in TOML.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            self.error(f"{key} must be {_KIND_NAMES[kind]}")
            return None
        problem = check(value) if check is not None else None
        if problem:
            self.error(f"{key}: {problem}")
            return None
        return value

    def route(self) -> Route | None:
        for key in self.table:
            if key not in ROUTE_KEYS:
                self.error(f"unknown key {_q(key)}{_suggest(key, ROUTE_KEYS)}")
        name = self.get("name", str, _check_route_name)
        if "name" not in self.table:
            self.error("name is required")
        upstream = self._upstream()
        prefix = self.get("repo_prefix", str, _check_prefix)
        host = self.get("host", str, _check_host)
        path = self.get("path", str, _check_path)
        namespace = self.get("namespace", str, _check_namespace)
        allow = self._allow()
        upstream_ca = self._file("upstream_ca")
        redirects = self.get("blob_redirects", str, _check_blob_redirects)
        cache = self.get("cache", bool)
        credentials = self._credentials()
        if self.errors or name is None or upstream is None or credentials is None:
            return None
        return Route(
            upstream=upstream,
            prefix=(prefix or "").strip("/"),
            credentials=credentials,
            blob_redirects=BlobRedirects(redirects) if redirects else BlobRedirects.PASS,
            upstream_ca=upstream_ca,
            name=name,
            host=host.lower() if host else None,
            path=path,
            namespace=namespace.lower() if namespace else None,
            allow=allow,
            cache=True if cache is None else cache,
        )

    def _upstream(self) -> Upstream | None:
        if "upstream" not in self.table:
            self.error("upstream is required (a URL, a host name or a known name: docker.io, ...)")
            return None
        text = self.get("upstream", str)
        if text is None:
            return None
        try:
            return Upstream.from_name(text)
        except ValueError as error:
            self.error(f"upstream {_q(text)}: {error}")
            return None

    def _allow(self) -> tuple[str, ...]:
        patterns = self.get("allow", list)
        if patterns is None:
            return ()
        if not patterns:
            self.error("allow is empty: list at least one pattern, or leave allow out")
            return ()
        for pattern in patterns:
            if not isinstance(pattern, str):
                self.error("allow must be a list of strings")
                return ()
            problem = _check_glob(pattern)
            if problem:
                self.error(f"allow {_q(pattern)}: {problem}")
        return tuple(patterns)

    def _path(self, key: str) -> str | None:
        value = self.get(key, str, lambda text: None if text.strip() else "must not be empty")
        if value is None:
            return None
        return os.path.join(self.base, os.path.expanduser(value))

    def _file(self, key: str) -> str | None:
        """A file the proxy reads later (a CA bundle, a Google key): it must be readable now."""
        path = self._path(key)
        if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            self.error(f"{key}: {_q(path)} is not a readable file")
            return None
        return path

    def _secret(self, key: str) -> str | None:
        """A secret's file, read now; the value never appears in an error."""
        path = self._path(key)
        if path is None:
            return None
        try:
            value = _read_text(path).strip()
        except ValueError as error:
            self.error(f"{key}: {error}")
            return None
        if not value:
            self.error(f"{key}: {_q(path)} is empty")
            return None
        return value

    def _credentials(self) -> Credentials | None:
        kinds = [
            kind
            for kind, keys in (
                ("username + password_file", ("username", "password_file")),
                ("auth_header_file", ("auth_header_file",)),
                ("google_credentials", ("google_credentials", "google_json_key")),
                ("google_adc", ("google_adc",)),
            )
            if any(key in self.table for key in keys)
        ]
        if len(kinds) > 1:
            self.error(f"choose one kind of credentials, not {' and '.join(kinds)}")
            return None
        username = self.get("username", str, lambda text: None if text else "must not be empty")
        if ("username" in self.table) != ("password_file" in self.table):
            self.error("username and password_file go together")
            return None
        if "google_json_key" in self.table and "google_credentials" not in self.table:
            self.error("google_json_key needs google_credentials")
            return None
        before = len(self.errors)
        credentials = Credentials(
            auth_header=self._secret("auth_header_file"),
            username=username,
            password=self._secret("password_file"),
            google_key_file=self._file("google_credentials"),
            google_adc=bool(self.get("google_adc", bool)),
            google_json_key=bool(self.get("google_json_key", bool)),
        )
        return credentials if len(self.errors) == before else None


_KIND_NAMES: dict[type, str] = {
    str: "a string",
    bool: "true or false",
    list: "a list",
}


def _check_route_name(text: str) -> str | None:
    if not ROUTE_NAME_RE.fullmatch(text):
        return f'{_q(text)} is not a valid route name (lower-case letters, digits and "-")'
    return None


def _check_prefix(text: str) -> str | None:
    prefix = text.strip("/")
    if prefix and not NAME_RE.fullmatch(prefix):
        return f"{_q(text)} is not a valid repository path"
    return None


def _check_host(text: str) -> str | None:
    host = text.lower()
    if ":" in host:
        return f"{_q(text)}: give the host name without a port (ports are ignored)"
    if not HOST_RE.fullmatch(host):
        return f"{_q(text)} is not a host name (or a pattern such as *.example.com)"
    return None


def _check_path(text: str) -> str | None:
    if "/" in text or not NAME_RE.fullmatch(text):
        return f"{_q(text)} is not one repository name component (such as hub or ghcr)"
    return None


def _check_namespace(text: str) -> str | None:
    if not NAMESPACE_RE.fullmatch(text.lower()):
        return f"{_q(text)} is not a registry host name such as docker.io"
    return None


def _check_blob_redirects(text: str) -> str | None:
    if text not in {mode.value for mode in BlobRedirects}:
        return f'{_q(text)}: use "pass", "follow" or "store"'
    return None


def _check_glob(pattern: str) -> str | None:
    if not GLOB_RE.fullmatch(pattern) or "***" in pattern:
        return "use repository name characters with * (one component) and ** (any depth)"
    if pattern.startswith("/") or pattern.endswith("/") or "//" in pattern:
        return "no leading, trailing or double slashes"
    return None
