"""The shared store's bound (--cache-max-size with --cache-store) on a real Ceph RGW and a
real registry upstream: the least recently served objects go, the total ends under the
bound, one replica evicts at a time (``leases/evict``), and an evicted blob is fetched from
the upstream again, verified."""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.curl import curl
from tests.support.images import build_image, push
from tests.support.registry import RegistryServer
from tests.support.rgw import RGWServer
from tests.support.waiting import eventually

LAYER = 700 * 1024
BOUND = 3 * 1024 * 1024  # four layers fit, five do not
# Every serve is recorded, nothing is too recent to evict, and the period is short.
FAST = {
    "REGPROXY_CACHE_SERVED_EVERY": "0",
    "REGPROXY_CACHE_EVICT_MIN_IDLE": "0",
    "REGPROXY_CACHE_EVICT_EVERY": "1",
    "REGPROXY_CACHE_LEASE_TTL": "3",
}


@pytest.fixture
def upstream(tmp: Path) -> Iterator[RegistryServer]:
    with RegistryServer(
        directory=tmp / "upstream",
        extra_config={"log": {"level": "info", "accesslog": {"disabled": False}}},
    ) as server:
        yield server


def blob_gets(upstream: RegistryServer, digest: str) -> int:
    return len(re.findall(rf'"GET /v2/[^ ]*/blobs/{digest}', upstream.log_text()))


class Bucket:
    def __init__(self, rgw: RGWServer) -> None:
        self.rgw = rgw
        self.name = rgw.new_bucket()
        self.client: Any = rgw.client()

    def blobs(self) -> dict[str, int]:
        found = self.client.list_objects(self.name, "cache/blobs/", recursive=True)
        return {"sha256:" + o.object_name.rsplit("/", 1)[1]: o.size for o in found}

    def keys(self, prefix: str) -> list[str]:
        found = self.client.list_objects(self.name, prefix, recursive=True)
        return [o.object_name for o in found]

    def total(self) -> int | None:
        try:
            response = self.client.get_object(self.name, "cache/index/size")
        except Exception:
            return None
        try:
            return int(json.loads(response.read())["bytes"])
        finally:
            response.close()
            response.release_conn()

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(self.name, key, io.BytesIO(data), len(data))


@pytest.fixture
def layers(tmp: Path, upstream: RegistryServer) -> list[tuple[str, str]]:
    """Five images of one uncompressed layer each: (repository, layer digest)."""
    found = []
    for n in range(5):
        image = build_image(tmp / f"img{n}", layers=(LAYER,), tag="v1", compress=False)
        push(tmp / f"img{n}", "v1", f"{upstream.host_port}/e{n}:v1")
        found.append((f"e{n}", image.layers[0].digest))
    return found


def pull(proxy: Any, repository: str, digest: str) -> None:
    answer = curl(f"{proxy.url}/v2/{repository}/blobs/{digest}")
    assert answer.status == 200
    assert "sha256:" + hashlib.sha256(answer.body).hexdigest() == digest


def evictions(proxy: Any) -> list[str]:
    return [m for m in proxy.log_messages() if "evicted" in m and "least recently" in m]


def test_one_replica_evicts_at_a_time(
    start_proxy: Any, rgw: RGWServer, upstream: RegistryServer, layers: list[Any], tmp: Path
) -> None:
    bucket = Bucket(rgw)
    # Another replica holds the eviction lease and renews it (a new ETag every second).
    holding = threading.Event()
    holding.set()

    def hold() -> None:
        n = 0
        while holding.is_set():
            n += 1
            bucket.put(
                "cache/leases/evict",
                json.dumps({"holder": "test", "expires": time.time() + 3, "n": n}).encode(),
            )
            time.sleep(1.0)

    renewer = threading.Thread(target=hold, daemon=True)
    renewer.start()
    try:
        eventually(lambda: bucket.keys("cache/leases/") != [], 10, what="the test's lease")
        proxies = []
        for name in ("one", "two"):
            args = ["--upstream", upstream.url, "--cache-store", f"s3://{bucket.name}/cache"]
            args += ["--cache-dir", str(tmp / name), "--cache-max-size", str(BOUND)]
            proxies.append(start_proxy(args, env={**rgw.env(), **FAST}))
        for n, (repository, digest) in enumerate(layers):
            pull(proxies[n % 2], repository, digest)
        eventually(lambda: len(bucket.blobs()) == 5, 10, what="five blobs stored")
        # Over the bound, both replicas check every second, and neither evicts under the
        # lease another holds (and renews): seven seconds, more than twice the lease TTL.
        deadline = time.monotonic() + 7
        while time.monotonic() < deadline:
            assert len(bucket.blobs()) == 5
            time.sleep(0.5)
    finally:
        holding.clear()
        renewer.join(timeout=10)
    # Its holder stopped renewing: one replica takes it over after the TTL, and evicts.
    eventually(lambda: sum(bucket.blobs().values()) <= BOUND, 20, what="eviction")
    eventually(lambda: bucket.keys("cache/leases/") == [], 10, what="the lease released")
    # One run brought the store under the bound: the other replica had nothing to do.
    time.sleep(3)  # three more periodic checks of each replica
    runs = [len(evictions(p)) for p in proxies]
    assert sorted(runs) == [0, 1], runs
    takeovers = [m for p in proxies for m in p.log_messages() if "lease of test expired" in m]
    assert len(takeovers) == 1, takeovers


def test_an_object_deleted_mid_read_is_read_whole_or_not_at_all(rgw: RGWServer) -> None:
    """What another replica's read sees when eviction deletes its object: on RGW the read
    goes on to the end (the data is collected later); regproxy verifies every store read
    against its digest either way, so a cut read is an aborted body, never wrong bytes."""
    bucket = Bucket(rgw)
    data = bytes(range(256)) * (64 * 1024)  # 16 MiB: past RGW's head object
    bucket.put("cache/blobs/x", data)
    response = bucket.client.get_object(bucket.name, "cache/blobs/x")
    try:
        first = response.read(1 << 20)
        bucket.client.remove_object(bucket.name, "cache/blobs/x")
        assert bucket.keys("cache/blobs/") == []
        rest = response.read()
    finally:
        response.close()
        response.release_conn()
    assert hashlib.sha256(first + rest).digest() == hashlib.sha256(data).digest()
