"""The proxy's own upstream credentials: clients pull anonymously, credentials stay inside."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.curl import curl
from tests.support.images import skopeo_copy, verify_layout
from tests.support.metadata import MetadataServer
from tests.support.oauth import OAuthEndpoint
from tests.support.registry import RegistryServer
from tests.support.seed import SeededRegistry, StandardImages, seed_registry
from tests.support.storage import StorageHost
from tests.support.tokens import TokenIssuer


@pytest.fixture
def password_file(tmp: Path, proxy_credentials: tuple[str, str]) -> Path:
    path = tmp / "password"
    path.write_text(proxy_credentials[1] + "\n")  # as kubectl --from-file leaves it
    return path


def _with_user(seeded: SeededRegistry, user: str, password_file: Path, *extra: str) -> list[str]:
    return [
        "--upstream",
        seeded.url,
        "--repo-prefix",
        "proj",
        "--upstream-username",
        user,
        "--upstream-password-file",
        str(password_file),
        *extra,
    ]


def test_basic_auth_registry_pulled_anonymously(
    start_proxy, prefixed_htpasswd_registry, proxy_credentials, password_file, tmp: Path
) -> None:
    direct = skopeo_copy(
        f"docker://{prefixed_htpasswd_registry.host_port}/proj/app:v1", tmp / "direct", check=False
    )
    assert not direct.ok
    proxy = start_proxy(
        _with_user(prefixed_htpasswd_registry, proxy_credentials[0], password_file)
    )
    result = skopeo_copy(f"docker://{proxy.host_port}/app:v1", tmp / "out")
    assert result.digest == prefixed_htpasswd_registry["app:v1"]
    verify_layout(tmp / "out", result.digest)
    base = curl(proxy.url + "/v2/")
    assert base.status == 200
    assert base.header("WWW-Authenticate") is None
    assert proxy_credentials[1] not in proxy.log_text()


def test_private_token_registry_pulled_anonymously(
    start_proxy,
    prefixed_private_token_registry: SeededRegistry,
    private_token_issuer: TokenIssuer,
    proxy_credentials,
    password_file,
    tmp: Path,
) -> None:
    direct = skopeo_copy(
        f"docker://{prefixed_private_token_registry.host_port}/proj/app:v1",
        tmp / "direct",
        check=False,
    )
    assert not direct.ok
    proxy = start_proxy(
        _with_user(prefixed_private_token_registry, proxy_credentials[0], password_file)
    )
    private_token_issuer.clear()
    for ref in ("app:v1", "team/app:v1", "multi:v1"):
        result = skopeo_copy(
            f"docker://{proxy.host_port}/{ref}", tmp / ref.replace("/", "_"), ["--all"]
        )
        assert result.digest == prefixed_private_token_registry[ref]
    fetches = private_token_issuer.requests
    assert fetches, "the proxy fetched no token"
    assert all(request.user == proxy_credentials[0] for request in fetches)
    scopes = [scope for request in fetches for scope in request.scopes]
    assert "repository:proj/app:pull" in scopes
    assert all(scope.endswith(":pull") for scope in scopes)  # never push
    # Tokens are cached per scope: one fetch per repository (plus the /v2/ check).
    assert scopes.count("repository:proj/app:pull") == 1
    metrics = curl(proxy.url + "/metrics").body.decode()
    assert 'regproxy_token_fetches_total{outcome="ok",route="default"}' in metrics
    assert proxy_credentials[1] not in proxy.log_text()


def test_static_auth_header_from_the_environment(
    start_proxy, prefixed_private_token_registry: SeededRegistry, proxy_credentials, tmp: Path
) -> None:
    header = "Basic " + base64.b64encode(":".join(proxy_credentials).encode()).decode()
    proxy = start_proxy(
        ["--upstream", prefixed_private_token_registry.url, "--repo-prefix", "proj"],
        env={"AUTH_HEADER": header},
    )
    result = skopeo_copy(f"docker://{proxy.host_port}/app:v1", tmp / "out")
    assert result.digest == prefixed_private_token_registry["app:v1"]
    assert header not in proxy.log_text()


def test_rejected_credentials_give_a_clear_error(
    start_proxy, prefixed_private_token_registry: SeededRegistry, tmp: Path
) -> None:
    wrong = tmp / "wrong"
    wrong.write_text("not-the-password")
    proxy = start_proxy(_with_user(prefixed_private_token_registry, "proxyuser", wrong))
    answer = curl(proxy.url + "/v2/app/manifests/v1")
    assert answer.status == 403
    assert answer.error_codes() == ["UNAUTHORIZED"]
    assert answer.header("WWW-Authenticate") is None
    assert any(
        "route default" in message and "rejected" in message for message in proxy.log_messages()
    )
    assert "not-the-password" not in proxy.log_text()


def test_google_service_account_key_file(
    start_proxy, tmp: Path, standard_images: StandardImages
) -> None:
    access_token = "ya29." + secrets.token_urlsafe(24)
    with (
        OAuthEndpoint(access_token) as oauth,
        RegistryServer(
            auth="htpasswd",
            users={"oauth2accesstoken": access_token},
            directory=tmp / "registry",
        ) as registry,
    ):
        seeded = seed_registry(registry, standard_images, prefix="proj")
        key_file = oauth.write_key_file(tmp / "key.json")
        # A loopback upstream is no Google registry: the key file is named explicitly
        # (GOOGLE_APPLICATION_CREDENTIALS alone is honoured only for Google upstreams).
        proxy = start_proxy(
            [
                "--upstream",
                registry.url,
                "--repo-prefix",
                "proj",
                "--google-credentials",
                str(key_file),
            ]
        )
        for ref in ("app:v1", "multi:v1"):
            result = skopeo_copy(
                f"docker://{proxy.host_port}/{ref}", tmp / ref.replace(":", "_"), ["--all"]
            )
            assert result.digest == seeded[ref]
        # A signed JWT assertion, exchanged once: the token is reused until near expiry.
        assert len(oauth.grants) == 1
        assert oauth.grants[0]["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
        assert access_token not in proxy.log_text()


@pytest.fixture
def redirecting_registry(
    tmp: Path, standard_images: StandardImages, proxy_credentials
) -> Iterator[tuple[SeededRegistry, StorageHost]]:
    """An htpasswd registry that redirects blob GETs to a separate storage host."""
    directory = tmp / "redirecting"
    directory.mkdir()
    with (
        StorageHost(directory / "storage") as storage,
        RegistryServer(
            auth="htpasswd",
            users=dict([proxy_credentials]),
            directory=directory,
            extra_config={
                "middleware": {
                    "storage": [{"name": "redirect", "options": {"baseurl": storage.url}}]
                }
            },
        ) as registry,
    ):
        yield seed_registry(registry, standard_images, prefix="proj"), storage


def test_blob_redirects_pass_to_the_client_without_credentials(
    start_proxy, redirecting_registry, proxy_credentials, password_file, tmp: Path
) -> None:
    seeded, storage = redirecting_registry
    proxy = start_proxy(_with_user(seeded, proxy_credentials[0], password_file))
    layer = seeded["big:v1@layer"]
    answer = curl(proxy.url + f"/v2/big/blobs/{layer}")
    assert answer.status == 307
    assert (answer.header("Location") or "").startswith(storage.url + "/")
    storage.requests.clear()
    result = skopeo_copy(f"docker://{proxy.host_port}/big:v1", tmp / "out")
    assert result.digest == seeded["big:v1"]
    assert storage.requests, "the client did not fetch from the storage host"
    assert all("authorization" not in headers for headers in storage.requests)


def test_blob_redirects_followed_inside_the_proxy_without_credentials(
    start_proxy, redirecting_registry, proxy_credentials, password_file, tmp: Path
) -> None:
    seeded, storage = redirecting_registry
    proxy = start_proxy(
        _with_user(seeded, proxy_credentials[0], password_file, "--blob-redirects", "follow")
    )
    storage.requests.clear()
    layer = seeded["big:v1@layer"]
    answer = curl(proxy.url + f"/v2/big/blobs/{layer}")
    assert answer.status == 200
    assert int(answer.header("Content-Length") or -1) == len(answer.body)
    result = skopeo_copy(f"docker://{proxy.host_port}/big:v1", tmp / "out")
    assert result.digest == seeded["big:v1"]
    verify_layout(tmp / "out", result.digest)
    assert storage.requests, "the proxy did not fetch from the storage host"
    assert all("authorization" not in headers for headers in storage.requests)


def test_google_application_default_credentials_from_the_metadata_server(
    start_proxy, tmp: Path, standard_images: StandardImages
) -> None:
    """Cloud Run, GKE workload identity and GCE: the platform identity, no key file."""
    access_token = "ya29.metadata-" + secrets.token_urlsafe(16)
    gcloud_config = tmp / "gcloud"  # no gcloud credentials to find before the metadata server
    gcloud_config.mkdir()
    with (
        MetadataServer(access_token) as metadata,
        RegistryServer(
            auth="htpasswd",
            users={"oauth2accesstoken": access_token},
            directory=tmp / "registry",
        ) as registry,
    ):
        seeded = seed_registry(registry, standard_images, prefix="proj")
        proxy = start_proxy(
            ["--upstream", registry.url, "--repo-prefix", "proj", "--google-adc"],
            env={**metadata.environment, "CLOUDSDK_CONFIG": str(gcloud_config)},
        )
        for ref in ("app:v1", "team/app:v1"):
            result = skopeo_copy(f"docker://{proxy.host_port}/{ref}", tmp / ref.replace("/", "_"))
            assert result.digest == seeded[ref]
        assert metadata.token_requests() == 1
        assert access_token not in proxy.log_text()


def test_a_failing_google_refresh_is_a_502_not_a_crash(
    start_proxy, tmp: Path, prefixed_htpasswd_registry: SeededRegistry
) -> None:
    with OAuthEndpoint("unused") as oauth:
        key_file = oauth.write_key_file(tmp / "key.json")
    # The endpoint is gone now: its token_uri refuses connections.
    proxy = start_proxy(
        [
            "--upstream",
            prefixed_htpasswd_registry.url,
            "--repo-prefix",
            "proj",
            "--google-credentials",
            str(key_file),
        ]
    )
    answer = curl(proxy.url + "/v2/app/manifests/v1")
    assert answer.status == 502
    assert answer.error_codes() == ["UPSTREAM_UNAVAILABLE"]
    events = proxy.log_events()
    assert not [e for e in events if e.get("log_level") and e["log_level"].name == "critical"]
    assert any("Google key file" in message for message in proxy.log_messages())
