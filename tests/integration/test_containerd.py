"""containerd pulling through regproxy: a second real client with its own resolver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import Containerd
from tests.support.images import push
from tests.support.ports import free_port
from tests.support.registry import RegistryServer
from tests.support.seed import SeededRegistry, StandardImages
from tests.support.tools import require_programs

require_programs("containerd (Debian package containerd)", "ctr", what="containerd")


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    with Containerd(tmp_path_factory.mktemp("containerd")) as daemon:
        yield daemon


def test_pull_through_a_prefix(
    containerd: Containerd, start_proxy, prefixed_registry: SeededRegistry
) -> None:
    proxy = start_proxy(["--upstream", prefixed_registry.url, "--repo-prefix", "proj"])
    for ref in ("multi:v1", "team/app:v1", "big:v1"):
        digest = containerd.fetch(f"{proxy.host_port}/{ref}", "--plain-http")
        assert digest == prefixed_registry[ref]


def test_token_dance_through_the_proxy(
    containerd: Containerd, start_proxy, prefixed_token_registry: SeededRegistry, token_issuer
) -> None:
    proxy = start_proxy(["--upstream", prefixed_token_registry.url, "--repo-prefix", "proj"])
    token_issuer.clear()
    digest = containerd.fetch(f"{proxy.host_port}/app:v1", "--plain-http", namespace="token")
    assert digest == prefixed_token_registry["app:v1"]
    assert "repository:proj/app:pull" in token_issuer.requested_scopes()


def test_as_a_docker_io_mirror_with_ns(
    containerd: Containerd,
    start_proxy,
    registry: RegistryServer,
    standard_images: StandardImages,
    tmp: Path,
) -> None:
    """containerd's mirror configuration adds ``?ns=docker.io`` to every request."""
    push(standard_images.layout, "app", f"{registry.host_port}/library/mirrored:v1")
    proxy = start_proxy(["--upstream", registry.url])
    hosts = tmp / "hosts" / "docker.io"
    hosts.mkdir(parents=True)
    # The fallback server is a closed loopback port: nothing may reach the internet.
    (hosts / "hosts.toml").write_text(
        f'server = "http://127.0.0.1:{free_port()}"\n\n'
        f'[host."http://{proxy.host_port}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    digest = containerd.fetch(
        "docker.io/library/mirrored:v1", "--hosts-dir", str(tmp / "hosts"), namespace="mirror"
    )
    assert digest == standard_images.app.digest
    proxy.stop()
    paths = [
        event["path"]
        for event in proxy.log_events()
        if event.get("log_namespace") == "regproxy.access"
    ]
    assert "/v2/library/mirrored/manifests/v1" in paths
