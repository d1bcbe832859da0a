"""The environment variables regproxy reads, once, while its options are parsed.

The original (serverless-registry-proxy) was configured by the environment alone, and its
variables keep their meaning: ``PORT``, ``HOST``, ``TLS_CERT`` and ``TLS_KEY`` (the
listener), ``REGISTRY_HOST``, ``REPO_PREFIX`` and ``AUTH_HEADER`` (the route),
``GOOGLE_APPLICATION_CREDENTIALS`` and ``DISABLE_BROWSER_REDIRECTS``. regproxy's own
settings have ``REGPROXY_*`` variables. A flag always wins over its variable.

The option table (``regproxy.tap``) names no variable in its logic: the tables here say
which option each variable fills, and nothing reads ``os.environ`` after start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

import attrs
from twisted.python import usage

from . import option_values as values
from .cache.sizes import parse_size
from .config import StoreTiming
from .protocol.hosts import is_google_registry
from .server.cpus import worker_count


@attrs.frozen
class Variable:
    """An environment variable that fills ``option`` when the flag was not given."""

    name: str
    option: str
    coerce: Callable[[str], Any] = str


# Read first: a routes file replaces every route variable.
CONFIG = Variable("REGPROXY_CONFIG", "config", values.readable_file)
# The one route of flags and variables, without --config.
ROUTE = (
    Variable("REGISTRY_HOST", "upstream", values.upstream_url),
    Variable("REPO_PREFIX", "repo-prefix", values.repository_prefix),
    Variable("AUTH_HEADER", "auth-header"),
    Variable("REGPROXY_UPSTREAM_USERNAME", "upstream-username"),
    Variable("REGPROXY_UPSTREAM_PASSWORD_FILE", "upstream-password-file", values.readable_file),
    Variable("REGPROXY_UPSTREAM_CREDENTIALS_DIR", "upstream-credentials-dir", values.directory),
)
# With --config these are ignored, with a warning: a deployment may set them for every
# instance, while a flag given beside --config is an error.
ROUTE_VARIABLES = tuple(variable.name for variable in ROUTE)
# The process's settings, whatever the routes.
SERVER = (
    Variable("REGPROXY_PUBLIC_URL", "public-url", values.public_url),
    Variable("REGPROXY_LOG_FORMAT", "log-format", values.log_format),
    Variable("REGPROXY_WORKERS", "workers", worker_count),
    Variable("REGPROXY_CACHE_DIR", "cache-dir", values.cache_directory),
    Variable("REGPROXY_CACHE_MAX_SIZE", "cache-max-size", parse_size),
)
GOOGLE_CREDENTIALS = "GOOGLE_APPLICATION_CREDENTIALS"


def fill(
    options: MutableMapping[str, Any], environ: Mapping[str, str], variables: Iterable[Variable]
) -> None:
    """Each variable that is set (and not empty) fills its option, unless a flag did."""
    for variable in variables:
        value = environ.get(variable.name)
        if options[variable.option] is None and value:
            options[variable.option] = _coerced(variable.name, variable.coerce, value)


def _coerced(name: str, coerce: Callable[[str], Any], value: str) -> Any:
    try:
        return coerce(value)
    except ValueError as error:
        raise usage.UsageError(f"{name}: {error}") from None


def browser_redirects_disabled(environ: Mapping[str, str]) -> bool:
    """``DISABLE_BROWSER_REDIRECTS``: any value at all, as the original read it."""
    return bool(environ.get("DISABLE_BROWSER_REDIRECTS"))


def listen_description(environ: Mapping[str, str]) -> str:
    """The listener of ``PORT`` (default 8080), ``HOST`` and ``TLS_CERT``/``TLS_KEY``, as a
    Twisted endpoint description (``:`` in paths and addresses escaped)."""
    port = environ.get("PORT", "8080")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise usage.UsageError(f"PORT: {port!r} is not a TCP port number")
    host = environ.get("HOST", "")
    interface = f":interface={host.replace(':', chr(92) + ':')}" if host else ""
    cert, key = environ.get("TLS_CERT"), environ.get("TLS_KEY")
    if bool(cert) != bool(key):
        raise usage.UsageError("TLS_CERT and TLS_KEY go together")
    if cert and key:
        escaped = [path.replace(":", "\\:") for path in (key, cert)]
        return f"ssl:{port}:privateKey={escaped[0]}:certKey={escaped[1]}{interface}"
    return f"tcp:{port}{interface}"


def google_credentials(
    options: MutableMapping[str, Any], environ: Mapping[str, str], warnings: list[str]
) -> None:
    """Take ``GOOGLE_APPLICATION_CREDENTIALS`` only for a Google upstream.

    The variable is common on workstations and CI runners; taken for any upstream it
    would send Google access tokens to Docker Hub's token service. An explicit choice
    of credential (or --google-adc, where google-auth reads the variable itself as part
    of ADC) wins over it. Call it once ``options["upstream"]`` is set.
    """
    value = environ.get(GOOGLE_CREDENTIALS)
    if options["google-credentials"] is not None or not value or options["google-adc"]:
        return
    host = options["upstream"].host
    if options["auth-header"] or options["upstream-username"]:
        warnings.append(
            f"{GOOGLE_CREDENTIALS} is ignored: another upstream credential was given explicitly"
        )
    elif not is_google_registry(host):
        warnings.append(
            f"{GOOGLE_CREDENTIALS} is ignored: the upstream {host} is not a Google registry "
            "(gcr.io, *.gcr.io, *.pkg.dev), and Google credentials go only to Google; "
            "pass --google-credentials to send them anyway"
        )
    else:
        options["google-credentials"] = _coerced(GOOGLE_CREDENTIALS, values.readable_file, value)


def ignored_with_routes_file(environ: Mapping[str, str]) -> list[str]:
    """The warnings for route variables set beside ``--config``."""
    return [
        f"{name} is ignored: --config defines the routes"
        for name in ROUTE_VARIABLES
        if environ.get(name)
    ]


# The shared store's lease and eviction timing (tests and unusual stores; the defaults
# suit most).
STORE_TIMING = (
    Variable("REGPROXY_CACHE_SERVED_EVERY", "served_every", values.seconds),
    Variable("REGPROXY_CACHE_EVICT_EVERY", "evict_every", values.positive_seconds),
    Variable("REGPROXY_CACHE_EVICT_MIN_IDLE", "evict_min_idle", values.seconds),
    Variable("REGPROXY_CACHE_LEASE_TTL", "lease_ttl", values.positive_seconds),
)


def store_timing(environ: Mapping[str, str]) -> StoreTiming:
    """``StoreTiming`` with what the ``REGPROXY_CACHE_*`` variables set."""
    found = {
        variable.option: _coerced(variable.name, variable.coerce, environ[variable.name])
        for variable in STORE_TIMING
        if environ.get(variable.name)
    }
    return StoreTiming(**found)
