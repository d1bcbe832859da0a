"""Real clients following blob redirects to the object store (``blob_redirects = "store"``):
containerd verifies every digest it fetched; no blob passes through the proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.containerd import Containerd
from tests.support.images import skopeo_copy
from tests.support.rgw import RGWServer
from tests.support.seed import SeededRegistry
from tests.support.tools import require_programs
from tests.support.waiting import eventually

require_programs("containerd (Debian package containerd)", "ctr", what="containerd")


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    with Containerd(tmp_path_factory.mktemp("containerd")) as daemon:
        yield daemon


def test_containerd_follows_blob_redirects_to_the_store(
    containerd: Containerd,
    start_proxy: Any,
    rgw: RGWServer,
    seeded_registry: SeededRegistry,
    tmp: Path,
) -> None:
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
    redirecting = replica(1, "--blob-redirects", "store")
    digest = containerd.fetch(f"{redirecting.host_port}/big:v1", "--plain-http")
    assert digest == seeded_registry["big:v1"]
    redirecting.stop()
    blobs = [e for e in redirecting.log_events() if e.get("endpoint") == "blob"]
    assert blobs and {e.get("status") for e in blobs} == {307}
