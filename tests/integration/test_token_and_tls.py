"""Token auth through /_token against a registry that checks every scope, and TLS upstreams."""

from __future__ import annotations

from pathlib import Path

from tests.support.curl import curl
from tests.support.images import skopeo_copy, verify_layout
from tests.support.seed import SeededRegistry
from tests.support.tokens import TokenIssuer


def _proxy_for(start_proxy, seeded: SeededRegistry, *extra: str):
    return start_proxy(["--upstream", seeded.url, "--repo-prefix", "proj", *extra])


def test_anonymous_pull_through_the_token_dance(
    start_proxy, prefixed_token_registry: SeededRegistry, token_issuer: TokenIssuer, tmp: Path
) -> None:
    proxy = _proxy_for(start_proxy, prefixed_token_registry)
    token_issuer.clear()
    result = skopeo_copy(f"docker://{proxy.host_port}/team/app:v1", tmp / "out")
    assert result.digest == prefixed_token_registry["team/app:v1"]
    verify_layout(tmp / "out", result.digest)
    scopes = token_issuer.requested_scopes()
    # The registry checked these: it only serves proj/team/app with a proj/team/app token.
    assert "repository:proj/team/app:pull" in scopes
    assert all(":proj/" in scope for scope in scopes if scope.startswith("repository:"))


def test_challenges_point_at_the_proxy_without_the_prefix(
    start_proxy, prefixed_token_registry: SeededRegistry, token_issuer: TokenIssuer
) -> None:
    proxy = _proxy_for(start_proxy, prefixed_token_registry)
    base = curl(proxy.url + "/v2/")
    assert base.status == 401
    assert base.header("Docker-Distribution-API-Version") == "registry/2.0"
    challenge = base.header("WWW-Authenticate") or ""
    assert challenge.startswith(f'Bearer realm="http://127.0.0.1:{proxy.port}/_token"')
    assert 'service="public-registry"' in challenge
    manifest = curl(proxy.url + "/v2/app/manifests/v1")
    challenge = manifest.header("WWW-Authenticate") or ""
    assert 'scope="repository:app:pull"' in challenge
    assert "proj" not in challenge

    public = _proxy_for(
        start_proxy, prefixed_token_registry, "--public-url", "https://r.example.com"
    )
    challenge = curl(public.url + "/v2/").header("WWW-Authenticate") or ""
    assert 'realm="https://r.example.com/_token"' in challenge
    forwarded = curl(proxy.url + "/v2/", "-H", "X-Forwarded-Proto: https", "-H", "Host: r.test")
    assert 'realm="https://r.test/_token"' in (forwarded.header("WWW-Authenticate") or "")


def test_token_requests_get_and_post_have_every_scope_rewritten(
    start_proxy, prefixed_token_registry: SeededRegistry, token_issuer: TokenIssuer
) -> None:
    proxy = _proxy_for(start_proxy, prefixed_token_registry)
    token_issuer.clear()
    got = curl(
        proxy.url + "/_token?service=public-registry&scope=repository:app:pull"
        "&scope=repository:team/app:pull,push"
    )
    assert got.status == 200
    assert got.json()["token"]
    assert token_issuer.requests[-1].query["scope"] == [
        "repository:proj/app:pull",
        "repository:proj/team/app:pull",
    ]
    assert token_issuer.requests[-1].query["service"] == ["public-registry"]

    posted = curl(
        proxy.url + "/_token",
        "-X",
        "POST",
        "--data-urlencode",
        "grant_type=password",
        "--data-urlencode",
        "username=nobody",
        "--data-urlencode",
        "password=wrong",
        "--data-urlencode",
        "service=public-registry",
        "--data-urlencode",
        "client_id=test",
        "--data-urlencode",
        "scope=repository:app:pull repository:multi:pull",
    )
    assert posted.status == 401  # bad password: the issuer's answer passes through
    assert token_issuer.requests[-1].form["scope"] == [
        "repository:proj/app:pull repository:proj/multi:pull"
    ]

    bare = curl(proxy.url + "/_token?service=public-registry")
    assert bare.status == 200
    assert "scope" not in token_issuer.requests[-1].query


def test_client_credentials_reach_a_private_registry_through_the_proxy(
    start_proxy,
    prefixed_private_token_registry: SeededRegistry,
    proxy_credentials: tuple[str, str],
    tmp: Path,
) -> None:
    proxy = _proxy_for(start_proxy, prefixed_private_token_registry)
    refused = skopeo_copy(f"docker://{proxy.host_port}/app:v1", tmp / "anon", check=False)
    assert not refused.ok
    allowed = skopeo_copy(
        f"docker://{proxy.host_port}/app:v1", tmp / "creds", creds=proxy_credentials
    )
    assert allowed.digest == prefixed_private_token_registry["app:v1"]


def test_tls_upstream_with_the_operator_ca(
    start_proxy, prefixed_tls_registry: SeededRegistry, tls_files, tmp: Path
) -> None:
    trusted = start_proxy(
        [
            "--upstream",
            prefixed_tls_registry.url,
            "--repo-prefix",
            "proj",
            "--upstream-ca",
            str(tls_files.ca_cert),
        ]
    )
    result = skopeo_copy(f"docker://{trusted.host_port}/multi:v1", tmp / "out", ["--all"])
    assert result.digest == prefixed_tls_registry["multi:v1"]
    verify_layout(tmp / "out", result.digest)

    untrusted = start_proxy(["--upstream", prefixed_tls_registry.url, "--repo-prefix", "proj"])
    answer = curl(untrusted.url + "/v2/app/manifests/v1")
    assert answer.status == 502
    assert answer.error_codes() == ["UPSTREAM_UNAVAILABLE"]
