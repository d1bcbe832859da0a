"""Who may read what the cache holds, through real registries that grant different users
different repositories (the tests' own token issuer checks scopes).

The cache must never widen access: a blob it holds is served to a client only when the
upstream would serve that client that blob in that repository. What it remembers to save
upstream questions (that a credential was admitted for a repository, that a repository
holds a digest) is remembered per credential and per repository, never more broadly.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.curl import curl
from tests.support.images import ImageInfo, RegistryClient, build_image, push
from tests.support.registry import RegistryServer
from tests.support.tokens import TokenIssuer
from tests.support.waiting import eventually

ADMIN = ("admin", "admin-password")
ALICE = ("alice", "alice-password")
BOB = ("bob", "bob-password")
OCI_ACCEPT = "Accept: application/vnd.oci.image.manifest.v1+json"
# The proxy remembers a credential's admission to a repository this long (ACCESS_MEMORY).
ADMISSION_MEMORY = 60.0


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenIssuer]:
    """No anonymous access; alice may read secret/app only, bob other/app only."""
    with TokenIssuer(
        tmp_path_factory.mktemp("issuer-scoped"),
        users=dict([ADMIN, ALICE, BOB]),
        anonymous_pull=False,
        service="scoped-registry",
        repositories={ALICE[0]: ["secret/app"], BOB[0]: ["other/app"]},
    ) as issuer:
        yield issuer


@pytest.fixture(scope="module")
def scoped(
    tmp_path_factory: pytest.TempPathFactory, issuer: TokenIssuer
) -> Iterator[RegistryServer]:
    with RegistryServer(
        auth="token",
        token_issuer=issuer,
        directory=tmp_path_factory.mktemp("registry-scoped"),
    ) as server:
        yield server


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """Anonymous, no auth at all: every repository is public."""
    with RegistryServer(directory=tmp_path_factory.mktemp("registry-public")) as server:
        yield server


def image_in(
    registry: RegistryServer, tmp: Path, *repositories: str, creds: tuple[str, str] | None = None
) -> ImageInfo:
    """A new image with a layer of its own, pushed to ``repositories`` (as ``:v1``)."""
    image = build_image(tmp / "layout", layers=(40 * 1024,), tag="v1")
    for repository in repositories:
        push(tmp / "layout", "v1", f"{registry.host_port}/{repository}:v1", creds=creds)
    return image


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def cache_events(proxy, path: str) -> list[object]:
    return [e.get("cache") for e in proxy.log_events() if e.get("path") == path]


def test_an_admission_is_one_credentials_not_the_repositorys(
    start_proxy, scoped: RegistryServer, tmp: Path
) -> None:
    """After alice was admitted to secret/app (a blob served from the cache), neither an
    anonymous client nor bob, who may not read secret/app, is served it within the
    admission memory: each credential is asked about upstream."""
    image = image_in(scoped, tmp, "secret/app", creds=ADMIN)
    image_in(scoped, tmp / "bobs", "other/app", creds=ADMIN)
    layer = image.layers[0]
    path = f"/v2/secret/app/blobs/{layer.digest}"
    scope = "repository:secret/app:pull"
    proxy = start_proxy(["--upstream", scoped.url, "--cache-dir", str(tmp / "cache")])
    alice = RegistryClient(proxy.url, creds=ALICE)
    first = alice.request("GET", path, scope=scope)
    assert (first.status, sha256(first.body)) == (200, layer.digest)
    # Stored, then served from the cache: alice's admission is remembered now.
    eventually(
        lambda: (
            alice.request("GET", path, scope=scope).status == 200
            and ("hit" in cache_events(proxy, path))
        )
    )
    admitted = time.monotonic()

    anonymous = curl(proxy.url + path)
    assert anonymous.status == 401
    assert sha256(anonymous.body) != layer.digest
    # bob asks for secret/app: his token carries no action on it.
    bob = RegistryClient(proxy.url, creds=BOB)
    refused = bob.request("GET", path, scope=scope)
    assert refused.status in (401, 403)
    assert sha256(refused.body) != layer.digest
    # bob with a good token for his own repository, sent for secret/app.
    wrong_scope = bob.request("GET", path, scope="repository:other/app:pull")
    assert wrong_scope.status in (401, 403)
    assert bob.request("HEAD", path, scope=scope).status in (401, 403)
    assert time.monotonic() - admitted < ADMISSION_MEMORY, "too slow to test the memory"
    # alice still reads it from the cache.
    again = alice.request("GET", path, scope=scope)
    assert (again.status, sha256(again.body)) == (200, layer.digest)
    proxy.stop()
    events = [e for e in proxy.log_events() if e.get("path") == path]
    served = [e for e in events if e.get("status") == 200]
    assert len(served) >= 3
    assert all(e.get("status") in (200, 401, 403) for e in events)


@pytest.mark.parametrize("who", ["proxy-held credentials", "a public repository"])
def test_a_cached_blob_is_served_for_another_repository_only_if_the_upstream_holds_it_there(
    start_proxy,
    scoped: RegistryServer,
    public: RegistryServer,
    tmp: Path,
    who: str,
) -> None:
    """A blob pushed to only-a only, cached through only-a: the proxy never asks the
    client's access to other-b (its own credentials, or a public repository, need no
    admission), so only the upstream's word that other-b holds the digest may open it."""
    if who == "proxy-held credentials":
        registry, creds = scoped, ADMIN
        password = tmp / "password"
        password.write_text(ADMIN[1])
        extra = ["--upstream-username", ADMIN[0], "--upstream-password-file", str(password)]
    else:
        registry, creds, extra = public, None, []
    suffix = who.split(" ")[1]  # a repository name of this test's own
    only_a, other_b, holder = (f"{name}-{suffix}/app" for name in ("only-a", "other-b", "holder"))
    image = image_in(registry, tmp, only_a, creds=creds)
    # other-b exists, with an image of its own: its 404 is about the blob, not the name.
    image_in(registry, tmp / "other", other_b, creds=creds)
    layer = image.layers[0]
    proxy = start_proxy(["--upstream", registry.url, "--cache-dir", str(tmp / "cache"), *extra])
    # other-b is known to be readable (public: learnt from this answer) before the test.
    assert curl(proxy.url + f"/v2/{other_b}/manifests/v1", "-H", OCI_ACCEPT).status == 200

    via_a = proxy.url + f"/v2/{only_a}/blobs/{layer.digest}"
    first = curl(via_a)
    assert (first.status, sha256(first.body)) == (200, layer.digest)
    eventually(
        lambda: (
            curl(via_a).status == 200
            and "hit" in cache_events(proxy, f"/v2/{only_a}/blobs/{layer.digest}")
        )
    )

    refused = curl(proxy.url + f"/v2/{other_b}/blobs/{layer.digest}")
    assert refused.status == 404
    assert refused.error_codes() == ["BLOB_UNKNOWN"]
    assert curl(proxy.url + f"/v2/{other_b}/blobs/{layer.digest}", "-I").status == 404

    # Once the upstream holds it in a repository too, the cache serves it there.
    push(tmp / "layout", "v1", f"{registry.host_port}/{holder}:v1", creds=creds)
    path = f"/v2/{holder}/blobs/{layer.digest}"
    held = curl(proxy.url + path)
    assert (held.status, sha256(held.body)) == (200, layer.digest)
    assert cache_events(proxy, path) == ["hit"]
    # And other-b still gets nothing: holder's confirmation is holder's alone.
    assert curl(proxy.url + f"/v2/{other_b}/blobs/{layer.digest}").status == 404
