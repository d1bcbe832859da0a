"""Token realms: which ones may receive credentials, and learning a route's own realm.

Credentials belong to hosts. The proxy's own credentials (and a client's, which it relays
through ``/_token``) go only to the upstream's origin and to a token realm that is on the
upstream's host or on a host the credential belongs to: for Google credentials a Google
registry host, otherwise a subdomain of the upstream's host or a sibling under the same
parent domain (``auth.docker.io`` for ``registry-1.docker.io``). A challenge naming any
other realm gets no credential.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import attrs
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from ..config import Route
from ..protocol import challenge
from ..protocol.hosts import is_google_registry
from .client import UpstreamClient, UpstreamFailure, user_agent
from .singleflight import SingleFlight

CHALLENGE_BODY_LIMIT = 64 * 1024
# Parent domains whose names belong to many tenants (one registry each): a sibling there
# is somebody else's host, never one the credentials belong to.
SHARED_PARENTS = frozenset(
    {
        "azurecr.io",
        "jfrog.io",
        "pkg.dev",
        "gcr.io",
        "ocir.io",
        "scw.cloud",
        "cloudfront.net",
        "github.io",
        "herokuapp.com",
        "appspot.com",
        "run.app",
        "azurewebsites.net",
        "digitaloceanspaces.com",
    }
)
SHARED_SUFFIXES = (".amazonaws.com", ".cloudfront.net", ".windows.net", ".run.app")
# How long "this upstream offers no token realm" is believed before asking again.
NO_REALM_MEMORY = 60.0


def _parent_domain(host: str) -> str | None:
    """``docker.io`` for ``registry-1.docker.io``; None for IPs and two-label names."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    labels = host.split(".")
    return ".".join(labels[1:]) if len(labels) >= 3 else None


def credential_may_go_to(route: Route, url: str) -> bool:
    """Whether the route's credentials (or a client's) may be sent to the realm ``url``."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:
        return False
    if route.upstream.scheme == "https" and parts.scheme != "https":
        return False
    if parts.scheme not in ("https", "http") or not hostname:
        return False
    realm_host, upstream_host = hostname.lower(), route.upstream.host.lower()
    if realm_host == upstream_host or realm_host.endswith("." + upstream_host):
        return True
    credentials = route.credentials
    if credentials.google_key_file or credentials.google_adc:
        return is_google_registry(realm_host)
    parent = _parent_domain(upstream_host)
    if parent is None or parent in SHARED_PARENTS or parent.endswith(SHARED_SUFFIXES):
        return False
    return realm_host == parent or realm_host.endswith("." + parent)


@attrs.frozen
class Realm:
    url: str
    service: str | None


class RealmCache:
    """The realm comes from the upstream's ``/v2/`` challenge, never from a client.

    It is learnt when first needed (the proxy starts while the upstream is down), once for
    all requests waiting on it, and kept until a token request fails, then learnt again.
    Every replica learns the same answer, so nothing here breaks behind a load balancer.
    """

    log = Logger()

    def __init__(self, upstream: UpstreamClient) -> None:
        self._upstream = upstream
        # Only realms actually found are kept: a 5xx or a load balancer's page answering
        # /v2/ once must not switch token auth off until the next restart.
        self._realms: dict[str, Realm] = {}
        self._learning: SingleFlight[str, Realm | None] = SingleFlight()
        # Routes whose upstream offered no usable realm, until when that answer is kept:
        # an anonymous upstream would otherwise be asked (and logged about) per token request.
        self._absent: dict[str, float] = {}
        self._warned: set[tuple[str, int]] = set()

    async def realm(self, route: Route) -> Realm | None:
        known = self._realms.get(route.name)
        if known is not None:
            return known
        if self._absent.get(route.name, 0.0) > self._upstream.clock.seconds():
            return None
        return await self._learning.run(route.name, lambda: self._learn(route))

    async def _learn(self, route: Route) -> Realm | None:
        try:
            response, _ = await self._upstream.fetch(
                "GET",
                route.upstream.origin + "/v2/",
                headers=Headers({b"user-agent": [user_agent(b"-")]}),
                route=route.name,
                limit=CHALLENGE_BODY_LIMIT,
            )
        except UpstreamFailure as failure:
            raise failure.oci() from None
        values = [
            v.decode("latin-1") for v in response.headers.getRawHeaders(b"www-authenticate", [])
        ]
        for item in challenge.parse_all(values):
            url = item.get("realm")
            if item.is_bearer and url and credential_may_go_to(route, url):
                realm = Realm(url, item.get("service"))
                self.log.info(
                    "route {route}: upstream token realm is {realm}", route=route.name, realm=url
                )
                self._realms[route.name] = realm
                return realm
        if (route.name, response.code) not in self._warned:
            self._warned.add((route.name, response.code))
            self.log.warn(
                "route {route}: upstream /v2/ answered {status} without a usable Bearer realm",
                route=route.name,
                status=response.code,
            )
        if response.code == 200:
            # An upstream that needs no token says so with a 200; a 5xx or a load
            # balancer's page says nothing, and is asked again next time.
            self._absent[route.name] = self._upstream.clock.seconds() + NO_REALM_MEMORY
        return None

    def forget(self, route: Route) -> None:
        self._realms.pop(route.name, None)
