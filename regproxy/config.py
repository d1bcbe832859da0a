"""Frozen configuration objects, built once at start-up from the parsed options."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

import attrs


class ConfigError(Exception):
    """A route configuration that cannot be served; ``errors`` holds every problem found."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


DOCKER_HUB_HOSTS = frozenset({"registry-1.docker.io", "index.docker.io", "docker.io"})
DOCKER_HUB_URL = "https://registry-1.docker.io"

# Registries a route's ``upstream`` may name without a URL. They all speak https on the
# name itself, except Docker Hub: ``docker.io`` is what people write and what containerd
# sends in ``?ns=``, but the registry API lives on registry-1.docker.io.
KNOWN_UPSTREAMS = {
    "docker.io": DOCKER_HUB_URL,
    "ghcr.io": "https://ghcr.io",
    "quay.io": "https://quay.io",
    "gcr.io": "https://gcr.io",
    "registry.k8s.io": "https://registry.k8s.io",
    "public.ecr.aws": "https://public.ecr.aws",
}
# Regional Container Registry hosts (us.gcr.io, eu.gcr.io, ...) and Artifact Registry
# (europe-west1-docker.pkg.dev, ...).
KNOWN_UPSTREAM_PATTERNS = (
    re.compile(r"[a-z0-9-]+\.gcr\.io"),
    re.compile(r"[a-z0-9-]+-docker\.pkg\.dev"),
)


def known_upstream(name: str) -> str | None:
    """The URL a known registry name stands for, or None when the name is not known."""
    name = name.strip().lower()
    if name in KNOWN_UPSTREAMS:
        return KNOWN_UPSTREAMS[name]
    if any(pattern.fullmatch(name) for pattern in KNOWN_UPSTREAM_PATTERNS):
        return f"https://{name}"
    return None


class BlobRedirects(enum.Enum):
    """What to do when the upstream answers a blob GET with a redirect to a storage host."""

    def __str__(self) -> str:
        return str(self.value)

    PASS = "pass"
    FOLLOW = "follow"
    # Blobs the shared object store holds: 307 to a presigned URL of the object.
    STORE = "store"


@attrs.frozen
class Upstream:
    """Where an upstream registry lives: ``scheme://host[:port]``, no path."""

    scheme: str
    netloc: str

    @classmethod
    def from_url(cls, text: str) -> Upstream:
        """Accept a URL or, as the original's REGISTRY_HOST did, a bare host (meaning https)."""
        if "://" not in text:
            text = "https://" + text
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"the scheme must be http or https, not {parts.scheme!r}")
        if not parts.hostname:
            raise ValueError("a host name is required")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("give only scheme, host and port, with no path")
        if parts.username or parts.password:
            raise ValueError("credentials do not belong in the URL; use the credential options")
        parts.port  # noqa: B018 - raises ValueError for a malformed port
        return cls(parts.scheme, parts.netloc.lower())

    @classmethod
    def from_name(cls, text: str) -> Upstream:
        """A known registry name (``docker.io``, ``ghcr.io``, ...), a URL or a bare host."""
        return cls.from_url(known_upstream(text) or text.strip())

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    @property
    def host(self) -> str:
        return urlsplit(self.origin).hostname or self.netloc

    @property
    def is_docker_hub(self) -> bool:
        return self.host in DOCKER_HUB_HOSTS


@attrs.frozen
class Credentials:
    """How the proxy itself authenticates to a route's upstream; secrets are never logged."""

    auth_header: str | None = attrs.field(default=None, repr=False)
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    google_key_file: str | None = None
    google_adc: bool = False
    google_json_key: bool = False

    @property
    def configured(self) -> bool:
        return bool(self.auth_header or self.username or self.google_key_file or self.google_adc)


def compile_globs(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regular expression for a route's ``allow`` globs; None allows every name.

    ``*`` matches within one path component, ``**`` across components, and ``**/`` also
    matches nothing (``**/app`` allows ``app``), as in .gitignore. Everything else is literal.
    """
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{_glob_regex(pattern)})" for pattern in patterns))


def _glob_regex(pattern: str) -> str:
    out = []
    for token in re.split(r"(\*\*/|\*\*|\*)", pattern):
        if token == "**/":
            out.append("(?:.*/)?")
        elif token == "**":
            out.append(".*")
        elif token == "*":
            out.append("[^/]*")
        else:
            out.append(re.escape(token))
    return "".join(out)


@attrs.frozen
class Route:
    """One upstream registry served under a repository prefix.

    ``host``, ``path`` and ``namespace`` say which requests the route answers (see
    ``regproxy.routing.matching``); a route with none of them is the default route.
    """

    upstream: Upstream
    prefix: str = ""
    credentials: Credentials = Credentials()
    blob_redirects: BlobRedirects = BlobRedirects.PASS
    upstream_ca: str | None = None
    name: str = "default"
    host: str | None = None
    path: str | None = None
    namespace: str | None = None
    allow: tuple[str, ...] = ()
    cache: bool = True
    # With ``[auth]``: who may pull what, first matching rule wins, no match denies. Empty
    # means the route admits ``users`` only (closed by default); unused without ``[auth]``.
    access: tuple[AccessRule, ...] = ()
    # Compiled once per route, not per request; derived from ``allow``, so not compared.
    _allow_re: re.Pattern[str] | None = attrs.field(
        init=False,
        eq=False,
        repr=False,
        default=attrs.Factory(lambda self: compile_globs(self.allow), takes_self=True),
    )

    @property
    def is_default(self) -> bool:
        return self.host is None and self.path is None and self.namespace is None

    def allows(self, name: str) -> bool:
        """Whether ``allow`` admits a repository, named as clients of the route name it.

        ``name`` is without the route's path component. On Docker Hub a one-component name
        is checked as ``library/<name>``, the repository it stands for.
        """
        if self._allow_re is None:
            return True
        if self.library_names and "/" not in name:
            name = f"library/{name}"
        return self._allow_re.fullmatch(name) is not None

    @property
    def library_names(self) -> bool:
        """Docker Hub keeps official images under ``library/``, as docker does for docker.io."""
        return self.upstream.is_docker_hub and not self.prefix

    def upstream_name(self, name: str) -> str:
        if self.prefix:
            return f"{self.prefix}/{name}"
        if self.library_names and "/" not in name:
            return f"library/{name}"
        return name

    def client_name(self, upstream_name: str) -> str | None:
        """The name a client uses for an upstream repository; None when outside the prefix."""
        if not self.prefix:
            return upstream_name
        head = self.prefix + "/"
        if upstream_name.startswith(head) and len(upstream_name) > len(head):
            return upstream_name[len(head) :]
        return None

    def browser_url(self, path: str) -> str:
        """Where a person who opens the proxy's address in a browser is sent."""
        if self.upstream.is_docker_hub:
            base = "https://hub.docker.com/r"
        else:
            base = f"https://{self.upstream.netloc}"
        parts = [part for part in (self.prefix, path.strip("/")) if part]
        return "/".join([base, *parts])


WINDOW_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@attrs.frozen
class RateLimit:
    """``count`` requests per ``window`` seconds, written ``100/6h`` (units s, m, h, d)."""

    count: int
    window: float

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d*)\s*([smhd])\s*", text)
        if match is None:
            raise ValueError(f"{text!r} is not a rate: write COUNT/WINDOW, like 100/6h")
        count, amount, unit = int(match[1]), int(match[2] or 1), match[3]
        if count < 1 or amount < 1:
            raise ValueError(f"{text!r}: the count and the window must be at least 1")
        return cls(count, amount * WINDOW_UNITS[unit])

    def __str__(self) -> str:
        return f"{self.count};w={int(self.window)}"


@attrs.frozen
class LimitsConfig:
    """``[limits]``: manifest GETs per client address (anonymous) and per principal."""

    anonymous: RateLimit | None = None
    users: RateLimit | None = None
    # redis://host:port/db: exact limits shared by every replica.
    redis: str | None = None


@attrs.frozen
class OIDCConfig:
    """``[[auth.oidc]]``: a workload-identity issuer whose JWTs are accepted as passwords.

    Clients log in with user name ``name``; the principal is ``<name>:<claim value>``.
    """

    name: str
    issuer: str
    audience: str
    username_claim: str = "sub"
    # PEM file of the CA that signed a private issuer's certificate; None: the system's.
    ca: str | None = None


@attrs.frozen
class AccessRule:
    """One ``[[routes.access]]`` entry: repositories (globs as ``allow``) and who may pull.

    Principals: ``anonymous``, ``users`` (anyone authenticated), a user name, ``@group``,
    ``<oidc name>:<subject glob>``.
    """

    repos: tuple[str, ...]
    pull: tuple[str, ...]


@attrs.frozen
class AuthConfig:
    """``[auth]`` (or ``--htpasswd``): the proxy authenticates its own clients."""

    htpasswd: str | None = None
    # EC P-256 private key (PEM) signing the proxy's tokens; None: one made at start-up
    # (fine for one process; replicas and workers must share a file).
    token_key: str | None = None
    token_ttl: float = 300.0
    groups: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    oidc: tuple[OIDCConfig, ...] = ()
    # Accept credentials over plain HTTP from anywhere (--insecure-auth).
    insecure: bool = False
    # Read when the configuration is loaded (never at a request): user name -> bcrypt hash
    # of the htpasswd file, and the token key's PEM. Secrets: never shown.
    users: Mapping[str, bytes] = attrs.field(factory=dict, repr=False, eq=False)
    token_key_pem: bytes | None = attrs.field(default=None, repr=False, eq=False)


DEFAULT_SCRUB_INTERVAL = 86400.0
DEFAULT_PUBLIC_TTL = 600.0
DEFAULT_ABANDONED_LIMIT = 1 << 30


@attrs.frozen
class StoreTiming:
    """When the shared store's eviction bookkeeping happens (seconds; see cache/s3/evict)."""

    # A replica rewrites a digest's served record at most this often.
    served_every: float = 600.0
    # Every replica checks the store's total this often (spread 0.8x-1.2x).
    evict_every: float = 300.0
    # Nothing served more recently than this is evicted.
    evict_min_idle: float = 1200.0
    # A download lease not renewed for this long is taken over by a waiting replica.
    lease_ttl: float = 30.0


@attrs.frozen
class CacheConfig:
    """``--cache-dir`` and its settings: the pull-through cache."""

    directory: str
    max_size: int
    stale_max_age: float = 7 * 86400.0
    tag_ttl: float = 0.0
    verify: bool = False
    # Seconds over which every stored object is re-hashed once, in the background; 0: never.
    scrub_interval: float = DEFAULT_SCRUB_INTERVAL
    # Seconds a repository seen to be public is trusted so for anonymous by-digest hits.
    public_ttl: float = DEFAULT_PUBLIC_TTL
    # Bytes in flight, in total, for downloads whose last client left; beyond, they stop.
    abandoned_limit: int = DEFAULT_ABANDONED_LIMIT
    # The shared object store behind the directory (s3://BUCKET/PREFIX); None: none.
    store: str | None = None
    # The bound of the shared store (--cache-max-size with --cache-store); None: its
    # bucket's lifecycle rules bound it.
    store_max_size: int | None = None
    store_timing: StoreTiming = StoreTiming()


@attrs.frozen
class Config:
    routes: tuple[Route, ...]
    listen: tuple[str, ...] = ("tcp:8080",)
    public_url: str | None = None
    disable_browser_redirects: bool = False
    metrics_listen: str | None = None
    shutdown_grace: float = 30.0
    # Seconds listeners keep accepting after SIGTERM while /readyz already answers 503.
    drain_delay: float = 0.0
    trusted_proxies: tuple[str, ...] = ()
    upstream_timeout: float = 30.0
    idle_timeout: float = 60.0
    # The TOML file the routes came from (--config): SIGHUP reads it again.
    routes_file: str | None = None
    cache: CacheConfig | None = None
    # None: anyone who reaches the proxy pulls what its upstream credentials can read.
    auth: AuthConfig | None = None
    limits: LimitsConfig | None = None

    @property
    def default_route(self) -> Route:
        """The route with no host, path or namespace; the first route when there is none."""
        return next((route for route in self.routes if route.is_default), self.routes[0])
