"""Real clients following blob redirects to the object store (``blob_redirects = "store"``):
containerd and podman verify every digest they fetched; no blob passes through the proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.containerd import Containerd
from tests.support.images import skopeo_copy
from tests.support.podman import Podman
from tests.support.rgw import RGWServer
from tests.support.seed import SeededRegistry
from tests.support.tools import require_programs
from tests.support.waiting import eventually


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    require_programs("containerd (Debian package containerd)", "ctr", what="containerd")
    with Containerd(tmp_path_factory.mktemp("containerd")) as daemon:
        yield daemon


@pytest.fixture
def redirecting(
    start_proxy: Any, rgw: RGWServer, seeded_registry: SeededRegistry, tmp: Path
) -> Any:
    """A replica answering blob GETs with redirects to a bucket another replica filled with
    big:v1."""
    bucket = rgw.new_bucket()

    def replica(number: int, *extra: str) -> Any:
        return start_proxy(
            [
                "--upstream",
                seeded_registry.url,
                "--cache-store",
                f"s3://{bucket}/c",
                "--cache-dir",
                str(tmp / f"tier{number}"),
                *extra,
            ],
            env=rgw.env(),
        )

    filler = replica(0)
    skopeo_copy(f"{filler.host_port}/big:v1", tmp / "warm", tag="v1")
    client: Any = rgw.client()
    eventually(
        lambda: not list(client.list_objects(bucket, "c/leases/")), 10, what="uploads complete"
    )
    return replica(1, "--blob-redirects", "store")


def every_blob_redirected(proxy: Any) -> None:
    proxy.stop()
    blobs = [e for e in proxy.log_events() if e.get("endpoint") == "blob"]
    assert blobs and {e.get("status") for e in blobs} == {307}


def test_containerd_follows_blob_redirects_to_the_store(
    containerd: Containerd, redirecting: Any, seeded_registry: SeededRegistry
) -> None:
    digest = containerd.fetch(f"{redirecting.host_port}/big:v1", "--plain-http")
    assert digest == seeded_registry["big:v1"]
    every_blob_redirected(redirecting)


def test_podman_follows_blob_redirects_to_the_store(
    redirecting: Any, seeded_registry: SeededRegistry
) -> None:
    host = redirecting.host_port
    with Podman(insecure=[host]) as podman:
        pulled = podman.run("pull", f"{host}/big:v1")
        assert pulled.returncode == 0, pulled.stderr
        # podman checks each blob against its digest as it stores it; the image is the
        # manifest the upstream holds.
        digest = podman.run("image", "inspect", "--format", "{{.Digest}}", f"{host}/big:v1")
        assert digest.stdout.strip() == seeded_registry["big:v1"], digest.stderr
    every_blob_redirected(redirecting)
