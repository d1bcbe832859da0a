"""``twist regproxy``: the option table, its cross-field checks, and the service.

What each option's text means is in ``option_values``; the environment variables that
fill options (the original's and regproxy's own) are in ``environment``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from twisted.application.service import IService
from twisted.python import usage

from . import SYSTEMD_HANDOVER, __version__, environment, option_help
from . import option_values as values
from .cache.sizes import parse_size, tier_max_size
from .config import (
    DEFAULT_ABANDONED_LIMIT,
    DEFAULT_PUBLIC_TTL,
    DEFAULT_SCRUB_INTERVAL,
    DOCKER_HUB_URL,
    BlobRedirects,
    CacheConfig,
    Config,
    ConfigError,
    Credentials,
    Route,
    Upstream,
)
from .routing.load import load_routes
from .routing.load_access import access_options
from .routing.matching import RouteTable
from .server.cpus import worker_count
from .server.handoff import WorkerSpec


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
        "Serve a container registry from your own host name: read-only, streaming, with the "
        "upstream's name prefix and credentials kept out of clients' sight. A flag wins over "
        "its environment variable; those of serverless-registry-proxy keep their meaning."
    )

    optFlags = [
        [
            "cache-verify",
            None,
            "Rehash the cache's large objects once at start-up, in the background.",
        ],
        [
            "check",
            None,
            "With --config, check the routes file, print every problem and exit 0 if there is "
            "none, else 1.",
        ],
        [
            "disable-browser-redirects",
            None,
            "Answer 404 instead of sending browsers to the upstream's web pages (env "
            "DISABLE_BROWSER_REDIRECTS, any value).",
        ],
        ["insecure-auth", None, "Accept credentials over plain HTTP (not only TLS/loopback)."],
        [
            "google-adc",
            None,
            "Authenticate upstream with Google Application Default Credentials (the metadata "
            "server, workload identity, gcloud on a workstation).",
        ],
        [
            "google-json-key",
            None,
            "Send the --google-credentials key file itself as _json_key basic credentials, as "
            "serverless-registry-proxy did, instead of access tokens.",
        ],
    ]

    optParameters = [
        [
            "upstream",
            None,
            None,
            f"Upstream registry, a URL such as https://gcr.io or http://127.0.0.1:5000 or a bare "
            f"host meaning https (env REGISTRY_HOST; default {DOCKER_HUB_URL}).",
            _named("upstream", values.upstream_url),
        ],
        [
            "repo-prefix",
            None,
            None,
            "Repository path put in front of every name upstream (env REPO_PREFIX).",
            _named("repo-prefix", values.repository_prefix),
        ],
        [
            "upstream-ca",
            None,
            None,
            "PEM bundle trusted for the upstream in addition to the system store.",
            _named("upstream-ca", values.readable_file),
        ],
        [
            "auth-header",
            None,
            None,
            "Fixed Authorization value sent upstream (env AUTH_HEADER, better than the flag, "
            "which process lists show).",
        ],
        [
            "upstream-username",
            None,
            None,
            "Username for the upstream, with --upstream-password-file (env "
            "REGPROXY_UPSTREAM_USERNAME).",
        ],
        [
            "upstream-password-file",
            None,
            None,
            "File holding the upstream password or access token (env "
            "REGPROXY_UPSTREAM_PASSWORD_FILE).",
            _named("upstream-password-file", values.readable_file),
        ],
        [
            "upstream-credentials-dir",
            None,
            None,
            "Directory that may hold files named username and password, such as a mounted "
            "Kubernetes Secret, both meaning basic credentials and neither meaning none (env "
            "REGPROXY_UPSTREAM_CREDENTIALS_DIR).",
            _named("upstream-credentials-dir", values.directory),
        ],
        [
            "google-credentials",
            None,
            None,
            "Google service-account key file (env GOOGLE_APPLICATION_CREDENTIALS, which is taken "
            "only for a Google upstream).",
            _named("google-credentials", values.readable_file),
        ],
        [
            "htpasswd",
            None,
            None,
            "Only these users (htpasswd, bcrypt) may pull; the proxy issues their tokens.",
            _named("htpasswd", values.readable_file),
        ],
        [
            "public-url",
            None,
            None,
            "The proxy's external base URL, used in rewritten realms and Locations (env "
            "REGPROXY_PUBLIC_URL; default: X-Forwarded-Proto and Host of each request).",
            _named("public-url", values.public_url),
        ],
        [
            "config",
            None,
            None,
            "TOML file of routes for many upstreams, re-read on SIGHUP, in place of the upstream "
            "and credential options (env REGPROXY_CONFIG).",
            _named("config", values.readable_file),
        ],
        [
            "blob-redirects",
            None,
            None,
            "What to do with redirects to storage hosts, pass handing them to clients and follow "
            "streaming the blob through the proxy (default pass).",
            _named("blob-redirects", values.blob_redirects),
        ],
        [
            "metrics-port",
            None,
            None,
            "Serve /metrics on this port number or Twisted endpoint instead of the main "
            "listeners.",
            _named("metrics-port", values.endpoint),
        ],
        [
            "shutdown-grace",
            None,
            30.0,
            "Seconds transfers in flight may take after SIGTERM, counted once the listeners "
            "close (default 30).",
            _named("shutdown-grace", values.seconds),
        ],
        [
            "drain-delay",
            None,
            0.0,
            "Seconds the listeners keep accepting after SIGTERM while /readyz already answers "
            "503, so that load balancers stop sending first (default 0).",
            _named("drain-delay", values.seconds),
        ],
        [
            "log-format",
            None,
            None,
            "Log as json or text (env REGPROXY_LOG_FORMAT; default: text on a terminal, "
            "otherwise one JSON object per line).",
            _named("log-format", values.log_format),
        ],
        [
            "upstream-timeout",
            None,
            30.0,
            "Seconds to wait for an upstream's response headers (default 30).",
            _named("upstream-timeout", values.positive_seconds),
        ],
        [
            "idle-timeout",
            None,
            60.0,
            "Seconds after which a transfer whose upstream or client stalls is abandoned, a "
            "silent client connection is closed, and a request whose headers or body have not "
            "all arrived is answered 408 (default 60).",
            _named("idle-timeout", values.positive_seconds),
        ],
        [
            "cache-dir",
            None,
            None,
            "Keep a pull-through cache in this directory, made if missing and shareable by "
            "several processes (env REGPROXY_CACHE_DIR; default: no cache).",
            _named("cache-dir", values.cache_directory),
        ],
        [
            "cache-store",
            None,
            None,
            "Keep the cache in an S3-compatible object store shared by every replica, "
            "s3://BUCKET/PREFIX, with endpoint and credentials from the AWS variables and "
            "files and --cache-dir as a local tier in front (also cache_store in the routes "
            "file; default: no object store).",
            _named("cache-store", values.store_location),
        ],
        [
            "cache-max-size",
            None,
            None,
            "Bound of the cache, such as 50G or 500M (env REGPROXY_CACHE_MAX_SIZE; default 80 % "
            "of the space free); with --cache-store, of the store (default: its lifecycle rules).",
            _named("cache-max-size", parse_size),
        ],
        [
            "cache-stale-max-age",
            None,
            7 * 86400.0,
            "Seconds a tag's last known digest may still be served while the upstream fails "
            "(default 604800, a week).",
            _named("cache-stale-max-age", values.seconds),
        ],
        [
            "cache-tag-ttl",
            None,
            0.0,
            "Seconds a tag is served from the cache without asking the upstream (default 0: "
            "each request revalidates, with one HEAD shared by concurrent requests).",
            _named("cache-tag-ttl", values.seconds),
        ],
        [
            "cache-scrub-interval",
            None,
            DEFAULT_SCRUB_INTERVAL,
            "Seconds over which every cached object is hashed again in the background, so "
            "that one corrupted on disk is found and removed (default 86400, a day; 0: never).",
            _named("cache-scrub-interval", values.seconds),
        ],
        [
            "cache-public-ttl",
            None,
            DEFAULT_PUBLIC_TTL,
            "Seconds a repository found public is served by digest to anonymous clients "
            "without asking the upstream, so one made private stops being served within this "
            "time (default 600).",
            _named("cache-public-ttl", values.seconds),
        ],
        [
            "cache-abandoned-limit",
            None,
            DEFAULT_ABANDONED_LIMIT,
            "Bytes in flight, in total, for downloads whose clients all left, such as 1G or "
            "500M, beyond which such a download stops instead of finishing into the cache "
            "(default 1G; 0: each stops when its last client leaves).",
            _named("cache-abandoned-limit", values.byte_limit),
        ],
        [
            "workers",
            None,
            None,
            "Worker processes serving every listener, or auto for one per CPU, a supervisor "
            "binding the listeners and restarting workers that die (env REGPROXY_WORKERS; "
            "default 1: one process, no supervisor).",
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
        self.environ = {**SYSTEMD_HANDOVER, **os.environ} if environ is None else dict(environ)
        self["port"] = []
        self["trusted-proxy"] = []
        # Said once at start-up, when logging runs (see makeService).
        self.warnings: list[str] = []
        # The routes of --config, loaded (and so checked) while options are parsed.
        self.routes: RouteTable | None = None

    def getSynopsis(self) -> str:
        """regproxy's own usage line, not twist's (``twist [options] plugin ...``)."""
        return option_help.SYNOPSIS

    def getUsage(self, width: int | None = None) -> str:
        """The options under headings (``option_help.GROUPS``), internal ones left out."""
        return option_help.usage_text(self, width)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Under ``twist``, a usage error is one line, not the whole help.

        twist answers a plugin's ``UsageError`` with the error and then its full 60-line
        help. A sub-command's options know they run under twist by their ``parent``; there
        regproxy says what is wrong and where help is, and exits with ``EX_USAGE`` as twist
        would (``--help`` exits from option parsing the same way).
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            if self.parent is None:
                raise
            # usage.Options words a failed coerce as "Parameter type enforcement failed:
            # --option: why"; the option and the why are the useful part.
            _exit_with_usage_error(str(error).removeprefix(_COERCE_FAILED))

    def opt_version(self) -> NoReturn:
        """Print regproxy's version and exit."""
        from twisted import __version__ as twisted_version

        print(f"regproxy {__version__} (Twisted {twisted_version})")
        sys.exit(0)

    def opt_port(self, endpoint: str) -> None:
        """Listen on this port number or Twisted endpoint, such as
        tcp:8080:interface=127.0.0.1 (repeatable; default tcp:8080, every interface; env PORT,
        HOST, TLS_CERT and TLS_KEY)."""
        try:
            self["port"].append(values.endpoint(endpoint))
        except ValueError as error:
            raise usage.UsageError(f"--port: {error}") from None

    opt_p = opt_port

    def opt_trusted_proxy(self, network: str) -> None:
        """Honour X-Forwarded-For from this address or CIDR network (repeatable)."""
        try:
            self["trusted-proxy"].append(values.network(network))
        except ValueError as error:
            raise usage.UsageError(f"--trusted-proxy: {error}") from None

    def postOptions(self) -> None:
        environment.fill(self, self.environ, [environment.CONFIG])
        if self["config"] is not None:
            self._routes_from_file()
        elif self["check"]:
            raise usage.UsageError("--check checks a routes file: give --config FILE")
        else:
            self._route_options()
        environment.fill(self, self.environ, environment.SERVER)
        if self["cache-store"] is None and self.routes is not None:
            self["cache-store"] = self.routes.cache_store
        if self["cache-max-size"] is not None and self["cache-dir"] is self["cache-store"] is None:
            raise usage.UsageError("--cache-max-size goes with --cache-dir")
        if self["workers"] is None:
            self["workers"] = 1
        if environment.browser_redirects_disabled(self.environ):
            self["disable-browser-redirects"] = True
        if not self["port"]:
            self["port"] = [environment.listen_description(self.environ)]
        try:
            self.auth = access_options(self, getattr(self.routes, "auth", None))
        except ValueError as error:
            raise usage.UsageError(str(error)) from None

    def _route_options(self) -> None:
        """The one route of the flags and the original's environment variables."""
        environment.fill(self, self.environ, environment.ROUTE)
        self._credentials_from_directory()
        if self["upstream"] is None:
            self["upstream"] = Upstream.from_url(DOCKER_HUB_URL)
        environment.google_credentials(self, self.environ, self.warnings)
        if self["repo-prefix"] is None:
            self["repo-prefix"] = ""
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

    def _routes_from_file(self) -> None:
        """--config: the file defines every route, so route options would be ignored:
        refuse them rather than guess. ``--check`` reports and exits here."""
        given = [f"--{name}" for name in ROUTE_OPTIONS if self[name] not in (None, False, 0)]
        if given:
            raise usage.UsageError(
                f"--config defines the routes: drop {', '.join(given)} (or put them in the file)"
            )
        try:
            self.routes = load_routes(self["config"])
            errors: list[str] = []
        except ConfigError as error:
            errors = error.errors
        if self["check"]:
            for line in errors:
                print(f"{self['config']}: {line}", file=sys.stderr)
            if not errors:
                print(f"{self['config']}: ok ({len(self.routes.routes)} routes)")  # type: ignore[union-attr]
            raise SystemExit(1 if errors else 0)
        if errors:
            raise usage.UsageError(f"{self['config']}: " + "; ".join(errors))
        self.warnings.extend(environment.ignored_with_routes_file(self.environ))

    def _credentials_from_directory(self) -> None:
        directory = self["upstream-credentials-dir"]
        option = "--upstream-credentials-dir"
        try:
            found = values.credentials_directory(directory) if directory else None
        except ValueError as error:
            raise usage.UsageError(f"{option}: {error}") from None
        if found is None:
            return
        if self["upstream-username"] or self["upstream-password-file"]:
            raise usage.UsageError(
                f"{option} and --upstream-username/--upstream-password-file: choose one"
            )
        self["upstream-username"], self["upstream-password-file"] = found

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
        if self.routes is not None:
            return self._server_config(self.routes.routes)
        route = Route(
            upstream=self["upstream"],
            prefix=self["repo-prefix"],
            credentials=self.credentials(),
            blob_redirects=self["blob-redirects"] or BlobRedirects.PASS,
            upstream_ca=self["upstream-ca"],
        )
        return self._server_config((route,))

    def _cache_config(self) -> CacheConfig | None:
        directory, store = self["cache-dir"], self["cache-store"]
        if directory is None and store is not None:
            # The local tier objects in flight pass through (and hot ones stay in).
            directory = values.temporary_tier()
        if directory is None:
            return None
        return CacheConfig(
            store=store,
            store_timing=environment.store_timing(self.environ),
            directory=directory,
            max_size=tier_max_size(self["cache-max-size"], directory, store=store is not None),
            store_max_size=self["cache-max-size"] if store is not None else None,
            stale_max_age=self["cache-stale-max-age"],
            tag_ttl=self["cache-tag-ttl"],
            verify=bool(self["cache-verify"]),
            scrub_interval=self["cache-scrub-interval"],
            public_ttl=self["cache-public-ttl"],
            abandoned_limit=self["cache-abandoned-limit"],
        )

    def _server_config(self, routes: tuple[Route, ...]) -> Config:
        return Config(
            cache=self._cache_config(),
            routes=routes,
            routes_file=self["config"],
            listen=tuple(self["port"]),
            public_url=self["public-url"],
            disable_browser_redirects=bool(self["disable-browser-redirects"]),
            metrics_listen=self["metrics-port"],
            shutdown_grace=self["shutdown-grace"],
            drain_delay=self["drain-delay"],
            trusted_proxies=tuple(self["trusted-proxy"]),
            upstream_timeout=self["upstream-timeout"],
            idle_timeout=self["idle-timeout"],
            auth=self.auth,
            limits=getattr(self.routes, "limits", None),
        )


_COERCE_FAILED = "Parameter type enforcement failed: "
# What a routes file replaces: given with --config, they are an error (flags) or ignored
# with a warning (the environment, see ``environment.ROUTE_VARIABLES``).
ROUTE_OPTIONS = (
    "upstream",
    "repo-prefix",
    "upstream-ca",
    "auth-header",
    "upstream-username",
    "upstream-password-file",
    "upstream-credentials-dir",
    "google-credentials",
    "google-adc",
    "google-json-key",
    "blob-redirects",
    "htpasswd",
)


def _exit_with_usage_error(message: str) -> NoReturn:
    sys.stderr.write(f"Error: {message}\nsee: twist regproxy --help\n")
    sys.stderr.flush()
    raise SystemExit(os.EX_USAGE)


def makeService(options: Options, reactor: Any = None, argv: list[str] | None = None) -> IService:
    from .server.logs import choose_twist_log_observer
    from .server.startup import StartupError

    if options.parent is not None:
        choose_twist_log_observer(options.parent, options["log-format"])
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    config = options.config()
    if options["workers"] > 1 and options["as-worker"] is None:
        # Only what the supervisor runs: the serving side (the upstream client, the cache,
        # the resources) is imported by workers alone (test_process_imports.py pins it).
        from .server.supervisor import build_supervisor

        return build_supervisor(
            config=config,
            count=options["workers"],
            # Workers run the supervisor's own twist command line (twist's options too).
            argv=sys.argv[1:] if argv is None else argv,
            environ=options.environ,
            reactor=reactor,
            warnings=options.warnings,
        )
    from .service import build_service

    try:
        return build_service(
            config,
            reactor,
            handle_sigterm=options.parent is not None,
            warnings=options.warnings,
            worker=options["as-worker"],
            environ=options.environ,
        )
    except StartupError as error:
        # Logging has not begun (twist starts it after makeService): stderr is the terminal
        # or the supervisor's log, and one line there is the whole story.
        raise SystemExit(f"Error: {error}") from None
