"""Which token realms may receive credentials: the host checks, as tables.

Each check is a suffix test on host names, and the one-character mistake that matters is
the missing dot: ``endswith("example.com")`` accepts ``evilexample.com``, a host anybody can
register, and ``endswith("a.azurecr.io")`` accepts ``evila.azurecr.io``, another tenant's
registry. Every table below has such a neighbour next to each host that is accepted.
"""

from __future__ import annotations

import pytest

from regproxy.config import Credentials, Route, Upstream
from regproxy.protocol.hosts import is_google_registry
from regproxy.upstream.realm import credential_may_go_to

BASIC = Credentials(username="robot", password="secret")
GOOGLE = Credentials(google_key_file="/run/key.json")


def route(upstream: str, credentials: Credentials = BASIC, scheme: str = "https") -> Route:
    return Route(Upstream(scheme, upstream), credentials=credentials)


@pytest.mark.parametrize(
    ("upstream", "realm", "allowed"),
    [
        # The upstream's own host, and its subdomains.
        ("example.com", "https://example.com/token", True),
        ("example.com", "https://auth.example.com/token", True),
        ("example.com", "https://a.b.example.com/token", True),
        ("example.com", "https://evilexample.com/token", False),
        ("example.com", "https://auth.evilexample.com/token", False),
        ("example.com", "https://example.com.evil.net/token", False),
        ("a.azurecr.io", "https://a.azurecr.io/oauth2/token", True),
        ("a.azurecr.io", "https://login.a.azurecr.io/oauth2/token", True),
        ("a.azurecr.io", "https://evila.azurecr.io/oauth2/token", False),
        ("a.azurecr.io", "https://b.azurecr.io/oauth2/token", False),
        ("a.azurecr.io", "https://azurecr.io/oauth2/token", False),
        # A sibling under the same parent domain (Docker Hub's layout) ...
        ("registry-1.docker.io", "https://auth.docker.io/token", True),
        ("registry-1.docker.io", "https://docker.io/token", True),
        ("registry-1.docker.io", "https://a.b.docker.io/token", True),
        # ... but not a name that merely ends like the parent.
        ("registry-1.docker.io", "https://evildocker.io/token", False),
        ("registry-1.docker.io", "https://auth.evildocker.io/token", False),
        ("registry-1.docker.io", "https://io/token", False),
        ("registry.gitlab.example.org", "https://gitlab.example.org/jwt/auth", True),
        ("registry.gitlab.example.org", "https://evilgitlab.example.org/jwt/auth", False),
        # Shared parents hold other tenants: no sibling is ours.
        ("mine.azurecr.io", "https://theirs.azurecr.io/oauth2/token", False),
        ("mine.jfrog.io", "https://theirs.jfrog.io/token", False),
        ("x.dkr.ecr.eu-west-1.amazonaws.com", "https://y.dkr.ecr.eu-west-1.amazonaws.com/", False),
        ("app.herokuapp.com", "https://other.herokuapp.com/token", False),
        ("svc.a.run.app", "https://other.a.run.app/token", False),
        # Two-label hosts and addresses have no parent to share.
        ("example.com", "https://com/token", False),
        ("127.0.0.1", "https://127.0.0.1/token", True),
        ("127.0.0.1", "https://0.0.1/token", False),
        ("127.0.0.1", "https://27.0.0.1/token", False),
        # Case does not matter; the scheme does.
        ("Example.COM", "https://AUTH.example.com/token", True),
        ("example.com", "http://auth.example.com/token", False),
        ("example.com", "ftp://example.com/token", False),
        ("example.com", "https:///token", False),
        ("example.com", "https://[::1/token", False),
    ],
)
def test_credentials_go_only_to_the_upstreams_own_hosts(
    upstream: str, realm: str, allowed: bool
) -> None:
    assert credential_may_go_to(route(upstream), realm) is allowed


def test_a_plain_http_upstream_may_name_a_plain_http_realm() -> None:
    plain = route("registry.internal.example", scheme="http")
    assert credential_may_go_to(plain, "http://auth.internal.example/token")
    assert not credential_may_go_to(plain, "http://evilinternal.example/token")


@pytest.mark.parametrize(
    ("upstream", "realm", "allowed"),
    [
        ("gcr.io", "https://gcr.io/v2/token", True),
        ("gcr.io", "https://eu.gcr.io/v2/token", True),
        ("gcr.io", "https://us-docker.pkg.dev/v2/token", True),
        ("gcr.io", "https://evilgcr.io/v2/token", False),
        ("gcr.io", "https://eu.evilgcr.io/v2/token", False),
        ("gcr.io", "https://evilpkg.dev/v2/token", False),
        ("gcr.io", "https://pkg.dev.evil.net/v2/token", False),
        ("europe-docker.pkg.dev", "https://oauth.example.com/token", False),
    ],
)
def test_google_credentials_go_only_to_google_registries(
    upstream: str, realm: str, allowed: bool
) -> None:
    assert credential_may_go_to(route(upstream, GOOGLE), realm) is allowed


@pytest.mark.parametrize(
    ("host", "google"),
    [
        ("gcr.io", True),
        ("GCR.IO.", True),
        ("eu.gcr.io", True),
        ("us-docker.pkg.dev", True),
        ("evilgcr.io", False),
        ("gcr.io.evil.net", False),
        ("evilpkg.dev", False),
        ("pkg.dev", False),
        ("io", False),
    ],
)
def test_google_registry_hosts(host: str, google: bool) -> None:
    assert is_google_registry(host) is google
