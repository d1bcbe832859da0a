"""``twist regproxy``: typed options (the original's environment variables too) and the service."""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import IService
from twisted.python import usage

from .config import DOCKER_HUB_URL, BlobRedirects, Config, Credentials, Route, Upstream
from .reference import NAME_RE
from .workers import WorkerSpec, worker_count


def _upstream(text: str) -> Upstream:
    return Upstream.from_url(text.strip())


_upstream.coerceDoc = (  # type: ignore[attr-defined]
    "A URL such as https://gcr.io or http://127.0.0.1:5000; a bare host means https."
)


def _prefix(text: str) -> str:
    prefix = text.strip().strip("/")
    if prefix and not NAME_RE.fullmatch(prefix):
        raise ValueError(f"{prefix!r} is not a valid repository path")
    return prefix


def _readable_file(text: str) -> str:
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise ValueError(f"{text!r} is not a readable file")
    return text


def _public_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("give an absolute http(s) URL such as https://r.example.com")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError("give only scheme, host and port, with no path")
    return f"{parts.scheme}://{parts.netloc}"


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("a non-negative number of seconds is required")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise ValueError("a positive number of seconds is required")
    return value


def _blob_redirects(text: str) -> BlobRedirects:
    try:
        return BlobRedirects(text.strip().lower())
    except ValueError:
        raise ValueError("use 'pass' or 'follow'") from None


_blob_redirects.coerceDoc = "'pass' hands redirects to clients; 'follow' streams them through."  # type: ignore[attr-defined]


def _network(text: str) -> str:
    return str(ipaddress.ip_network(text.strip(), strict=False))


def _named(option: str, coerce: Any) -> Any:
    """Make a coerce function's error name its option, so users see what to fix."""

    def named(text: str) -> Any:
        try:
            return coerce(text)
        except ValueError as error:
            raise ValueError(f"--{option}: {error}") from None

    named.coerceDoc = getattr(coerce, "coerceDoc", None)  # type: ignore[attr-defined]
    return named


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve a container registry from your own host name: read-only, streaming, with "
        "the upstream's name prefix and credentials kept out of clients' sight. Flags take "
        "precedence over the environment variables of serverless-registry-proxy (PORT, HOST, "
        "REGISTRY_HOST, REPO_PREFIX, AUTH_HEADER, DISABLE_BROWSER_REDIRECTS, "
        "GOOGLE_APPLICATION_CREDENTIALS, TLS_CERT, TLS_KEY)."
    )

    optFlags = [
        [
            "disable-browser-redirects",
            None,
            "Answer 404 instead of sending browsers upstream (env DISABLE_BROWSER_REDIRECTS).",
        ],
        [
            "google-adc",
            None,
            "Authenticate upstream with Google Application Default "
            "Credentials (metadata server, workload identity).",
        ],
        [
            "google-json-key",
            None,
            "Send the Google key file itself as _json_key basic "
            "credentials, as the original did, instead of access tokens.",
        ],
    ]

    optParameters = [
        [
            "upstream",
            None,
            None,
            f"Upstream registry URL (env REGISTRY_HOST; default {DOCKER_HUB_URL})",
            _named("upstream", _upstream),
        ],
        [
            "repo-prefix",
            None,
            None,
            "Repository path prepended upstream (env REPO_PREFIX).",
            _named("repo-prefix", _prefix),
        ],
        [
            "upstream-ca",
            None,
            None,
            "PEM bundle trusted for the upstream in addition to the system store.",
            _named("upstream-ca", _readable_file),
        ],
        [
            "auth-header",
            None,
            None,
            "Static Authorization value sent upstream (env "
            "AUTH_HEADER). Prefer the environment: flags show in process lists.",
        ],
        [
            "upstream-username",
            None,
            None,
            "Username for the upstream (env REGPROXY_UPSTREAM_USERNAME).",
        ],
        [
            "upstream-password-file",
            None,
            None,
            "File holding the upstream password or access "
            "token (env REGPROXY_UPSTREAM_PASSWORD_FILE).",
            _named("upstream-password-file", _readable_file),
        ],
        [
            "google-credentials",
            None,
            None,
            "Google service-account key file (env GOOGLE_APPLICATION_CREDENTIALS).",
            _named("google-credentials", _readable_file),
        ],
        [
            "public-url",
            None,
            None,
            "The proxy's external base URL, used in rewritten realms "
            "and Locations (env REGPROXY_PUBLIC_URL); default: from X-Forwarded-Proto and Host.",
            _named("public-url", _public_url),
        ],
        [
            "blob-redirects",
            None,
            BlobRedirects.PASS,
            "pass|follow: what to do with blob redirects to storage hosts.",
            _named("blob-redirects", _blob_redirects),
        ],
        [
            "metrics-port",
            None,
            None,
            "Separate endpoint for /metrics (then the main listener answers 404 there).",
        ],
        [
            "shutdown-grace",
            None,
            30.0,
            "Seconds in-flight transfers may take after SIGTERM.",
            _named("shutdown-grace", _seconds),
        ],
        [
            "upstream-timeout",
            None,
            30.0,
            "Seconds to wait for upstream response headers.",
            _named("upstream-timeout", _positive_seconds),
        ],
        [
            "idle-timeout",
            None,
            60.0,
            "Seconds an upstream body may stall, or a client read nothing, before the "
            "transfer is abandoned.",
            _named("idle-timeout", _positive_seconds),
        ],
        [
            "workers",
            None,
            None,
            "Worker processes serving every listener (default 1; 'auto': one per CPU; env "
            "REGPROXY_WORKERS). Above 1, a supervisor binds the listeners and restarts "
            "workers that die.",
            _named("workers", worker_count),
        ],
        [
            "as-worker",
            None,
            None,
            "Internal: set by the --workers supervisor on the workers it starts.",
            _named("as-worker", WorkerSpec.parse),
        ],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = dict(os.environ if environ is None else environ)
        self["port"] = []
        self["trusted-proxy"] = []

    def opt_port(self, endpoint: str) -> None:
        """Listen on this Twisted endpoint (repeatable; default tcp:8080; env PORT, HOST,
        TLS_CERT and TLS_KEY)."""
        self["port"].append(endpoint)

    opt_p = opt_port

    def opt_trusted_proxy(self, network: str) -> None:
        """Honour X-Forwarded-For from this address or CIDR network (repeatable)."""
        try:
            self["trusted-proxy"].append(_network(network))
        except ValueError as error:
            raise usage.UsageError(f"--trusted-proxy: {error}") from None

    def _from_env(self, option: str, variable: str, coerce: Any = str) -> None:
        value = self.environ.get(variable)
        if self[option] is None and value:
            try:
                self[option] = coerce(value)
            except ValueError as error:
                raise usage.UsageError(f"{variable}: {error}") from None

    def postOptions(self) -> None:
        self._from_env("upstream", "REGISTRY_HOST", _upstream)
        self._from_env("repo-prefix", "REPO_PREFIX", _prefix)
        self._from_env("auth-header", "AUTH_HEADER")
        self._from_env("upstream-username", "REGPROXY_UPSTREAM_USERNAME")
        self._from_env("upstream-password-file", "REGPROXY_UPSTREAM_PASSWORD_FILE", _readable_file)
        if not self["google-adc"]:
            # With --google-adc, google-auth reads this variable itself, as part of ADC.
            self._from_env("google-credentials", "GOOGLE_APPLICATION_CREDENTIALS", _readable_file)
        self._from_env("public-url", "REGPROXY_PUBLIC_URL", _public_url)
        self._from_env("workers", "REGPROXY_WORKERS", worker_count)
        if self["workers"] is None:
            self["workers"] = 1
        if self.environ.get("DISABLE_BROWSER_REDIRECTS"):
            self["disable-browser-redirects"] = True
        if self["upstream"] is None:
            self["upstream"] = Upstream.from_url(DOCKER_HUB_URL)
        if self["repo-prefix"] is None:
            self["repo-prefix"] = ""
        if not self["port"]:
            self["port"] = [self._port_from_env()]
        if bool(self["upstream-username"]) != bool(self["upstream-password-file"]):
            raise usage.UsageError("--upstream-username and --upstream-password-file go together")
        sources = [
            bool(self["auth-header"]),
            bool(self["upstream-username"]),
            bool(self["google-credentials"] or self["google-adc"]),
        ]
        if sum(sources) > 1:
            raise usage.UsageError(
                "choose one upstream credential: --auth-header, --upstream-username, or "
                "Google credentials"
            )
        if self["google-json-key"] and not self["google-credentials"]:
            raise usage.UsageError("--google-json-key needs --google-credentials")

    def _port_from_env(self) -> str:
        port = self.environ.get("PORT", "8080")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise usage.UsageError(f"PORT: {port!r} is not a TCP port number")
        host = self.environ.get("HOST", "")
        interface = f":interface={host.replace(':', chr(92) + ':')}" if host else ""
        cert, key = self.environ.get("TLS_CERT"), self.environ.get("TLS_KEY")
        if bool(cert) != bool(key):
            raise usage.UsageError("TLS_CERT and TLS_KEY go together")
        if cert and key:
            escaped = [path.replace(":", "\\:") for path in (key, cert)]
            return f"ssl:{port}:privateKey={escaped[0]}:certKey={escaped[1]}{interface}"
        return f"tcp:{port}{interface}"

    def credentials(self) -> Credentials:
        password = None
        if self["upstream-password-file"]:
            with open(self["upstream-password-file"], encoding="utf-8") as handle:
                password = handle.read().strip()
        return Credentials(
            auth_header=self["auth-header"],
            username=self["upstream-username"],
            password=password,
            google_key_file=self["google-credentials"],
            google_adc=bool(self["google-adc"]),
            google_json_key=bool(self["google-json-key"]),
        )

    def config(self) -> Config:
        route = Route(
            upstream=self["upstream"],
            prefix=self["repo-prefix"],
            credentials=self.credentials(),
            blob_redirects=self["blob-redirects"],
            upstream_ca=self["upstream-ca"],
        )
        return Config(
            routes=(route,),
            listen=tuple(self["port"]),
            public_url=self["public-url"],
            disable_browser_redirects=bool(self["disable-browser-redirects"]),
            metrics_listen=self["metrics-port"],
            shutdown_grace=self["shutdown-grace"],
            trusted_proxies=tuple(self["trusted-proxy"]),
            upstream_timeout=self["upstream-timeout"],
            idle_timeout=self["idle-timeout"],
        )


def makeService(options: Options, reactor: Any = None, argv: list[str] | None = None) -> IService:
    from .service import build_service

    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    config = options.config()
    if options["workers"] > 1 and options["as-worker"] is None:
        from .workers import build_supervisor

        return build_supervisor(
            count=options["workers"],
            listen=[*config.listen, *filter(None, [config.metrics_listen])],
            # Workers run the supervisor's own twist command line (twist's options too).
            argv=sys.argv[1:] if argv is None else argv,
            environ=options.environ,
            grace=config.shutdown_grace,
            reactor=reactor,
        )
    return build_service(config, reactor, worker=options["as-worker"])
