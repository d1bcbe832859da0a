"""The integration fixtures work against the real registries directly (no proxy involved)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import jwt
import pytest

from tests.support.images import (
    RegistryClient,
    SkopeoError,
    build_image,
    push,
    sha256_digest,
    skopeo_copy,
    skopeo_inspect,
    skopeo_inspect_bytes,
    skopeo_list_tags,
    verify_layout,
)
from tests.support.registry import RegistryServer
from tests.support.seed import SeededRegistry
from tests.support.tls import TLSFiles
from tests.support.tokens import Scope, TokenIssuer, libtrust_key_id


def test_scope_parse_with_host_port() -> None:
    scope = Scope.parse("repository:127.0.0.1:5000/team/app:pull,push")
    assert scope == Scope("repository", "127.0.0.1:5000/team/app", ("pull", "push"))
    assert str(scope) == "repository:127.0.0.1:5000/team/app:pull,push"
    assert Scope.parse("registry:catalog:*").actions == ("*",)


def test_kid_is_libtrust_fingerprint(token_issuer: TokenIssuer) -> None:
    parts = token_issuer.kid.split(":")
    assert len(parts) == 12 and all(len(p) == 4 for p in parts)
    header = jwt.get_unverified_header(token_issuer.sign("x", []))
    assert header["kid"] == token_issuer.kid
    assert header["alg"] == "RS256"
    assert libtrust_key_id(token_issuer._key.public_key()) == token_issuer.kid


def test_push_copy_verify_anonymous(registry: RegistryServer, tmp: Path) -> None:
    image = build_image(tmp / "layout", [1000, 3000], tag="self")
    push(tmp / "layout", "self", f"{registry.host_port}/selfcheck/push:v1")
    result = skopeo_copy(f"{registry.host_port}/selfcheck/push:v1", tmp / "out")
    assert result.digest == image.digest
    assert verify_layout(tmp / "out", image.digest) == image.digest
    raw = skopeo_inspect_bytes(f"{registry.host_port}/selfcheck/push:v1")
    assert sha256_digest(raw) == image.digest


def test_seeded_registry(seeded_registry: SeededRegistry, tmp: Path) -> None:
    host = seeded_registry.host_port
    result = skopeo_copy(f"{host}/multi:v1", tmp / "multi", ["--all"])
    assert result.digest == seeded_registry["multi:v1"]
    verify_layout(tmp / "multi", seeded_registry["multi:v1"])
    result = skopeo_copy(f"{host}/team/app:v1", tmp / "app")
    verify_layout(tmp / "app", seeded_registry["team/app:v1"])
    tags = skopeo_list_tags(f"{host}/many")
    assert sorted(tags) == seeded_registry.many_tags
    info = skopeo_inspect(f"{host}/big:v1")
    assert info["Layers"] == [seeded_registry["big:v1@layer"]]
    client = RegistryClient(seeded_registry.url)
    catalog = client.request("GET", "/v2/_catalog?n=2")
    assert catalog.status == 200
    assert len(catalog.json()["repositories"]) == 2
    assert 'rel="next"' in catalog.headers["Link"]


def test_token_registry_anonymous_pull(
    seeded_token_registry: SeededRegistry, token_issuer: TokenIssuer, tmp: Path
) -> None:
    token_issuer.clear()
    host = seeded_token_registry.host_port
    result = skopeo_copy(f"{host}/app:v1", tmp / "out")
    verify_layout(tmp / "out", seeded_token_registry["app:v1"])
    assert "repository:app:pull" in token_issuer.requested_scopes()
    assert all(r.user is None for r in token_issuer.requests)
    assert result.digest == seeded_token_registry["app:v1"]


def test_token_registry_rejects_untrusted_signature(
    token_registry: RegistryServer, tmp: Path
) -> None:
    forger = TokenIssuer(tmp / "forger", service="public-registry", issuer="regproxy-test-issuer")
    token = forger.sign("", [{"type": "repository", "name": "app", "actions": ["pull"]}])
    request = urllib.request.Request(
        f"{token_registry.url}/v2/app/tags/list", headers={"Authorization": f"Bearer {token}"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 401


def test_private_token_registry(
    seeded_private_token_registry: SeededRegistry,
    private_token_issuer: TokenIssuer,
    proxy_credentials: tuple[str, str],
    tmp: Path,
) -> None:
    host = seeded_private_token_registry.host_port
    denied = skopeo_copy(f"{host}/app:v1", tmp / "anon", check=False)
    assert denied.returncode != 0
    private_token_issuer.clear()
    ok = skopeo_copy(f"{host}/app:v1", tmp / "auth", creds=proxy_credentials)
    verify_layout(tmp / "auth", seeded_private_token_registry["app:v1"])
    assert ok.digest == seeded_private_token_registry["app:v1"]
    assert any(r.user == proxy_credentials[0] for r in private_token_issuer.requests)
    with pytest.raises(SkopeoError):
        skopeo_copy(f"{host}/app:v1", tmp / "bad", creds=(proxy_credentials[0], "wrong"))
    # the OAuth2 POST flow and the catalog grant
    body = urllib.parse.urlencode(
        {
            "grant_type": "password",
            "username": proxy_credentials[0],
            "password": proxy_credentials[1],
            "service": "private-registry",
            "scope": "registry:catalog:* repository:app:pull",
            "client_id": "selfcheck",
        }
    ).encode()
    with urllib.request.urlopen(private_token_issuer.realm, data=body, timeout=10) as response:
        token = json.load(response)["access_token"]
    request = urllib.request.Request(
        f"{seeded_private_token_registry.url}/v2/_catalog",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert "app" in json.load(response)["repositories"]
    assert private_token_issuer.requests[-1].scopes == [
        "registry:catalog:*",
        "repository:app:pull",
    ]


def test_htpasswd_registry(
    seeded_htpasswd_registry: SeededRegistry, proxy_credentials: tuple[str, str], tmp: Path
) -> None:
    host = seeded_htpasswd_registry.host_port
    ok = skopeo_copy(f"{host}/app:v1", tmp / "auth", creds=proxy_credentials)
    assert ok.digest == seeded_htpasswd_registry["app:v1"]
    verify_layout(tmp / "auth", ok.digest)
    denied = skopeo_copy(f"{host}/app:v1", tmp / "anon", check=False)
    assert denied.returncode != 0


def test_tls_registry(seeded_tls_registry: SeededRegistry, tls_files: TLSFiles, tmp: Path) -> None:
    host = seeded_tls_registry.host_port
    assert seeded_tls_registry.url.startswith("https://")
    ok = skopeo_copy(f"{host}/app:v1", tmp / "out", cert_dir=tls_files.cert_dir)
    verify_layout(tmp / "out", seeded_tls_registry["app:v1"])
    # without the CA the certificate is not trusted
    denied = skopeo_copy(f"{host}/app:v1", tmp / "untrusted", tls_verify=True, check=False)
    assert denied.returncode != 0
    assert "certificate" in denied.stderr
    assert ok.digest == seeded_tls_registry["app:v1"]
