"""The cache on a shared object store (--cache-store) with a real Ceph RGW, a real
distribution registry upstream (its access log counts what reached it) and real clients:
what one replica fetched, another serves without asking the upstream for it again."""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.cache import SlowRelay
from tests.support.curl import curl
from tests.support.images import build_image, push, skopeo_copy
from tests.support.registry import RegistryServer
from tests.support.rgw import RGWServer
from tests.support.seed import SeededRegistry, StandardImages, seed_registry
from tests.support.tcp_relay import TCPRelay
from tests.support.waiting import eventually


@pytest.fixture
def upstream(tmp: Path, standard_images: StandardImages) -> Iterator[SeededRegistry]:
    with RegistryServer(
        directory=tmp / "upstream",
        extra_config={"log": {"level": "info", "accesslog": {"disabled": False}}},
    ) as server:
        yield seed_registry(server, standard_images)


def upstream_gets(upstream: SeededRegistry, kind: str = "") -> int:
    pattern = rf'"GET /v2/[^ ]*/(?:blobs|manifests)/{kind}'
    return len(re.findall(pattern, upstream.registry.log_text()))


def blob_gets(upstream: SeededRegistry, digest: str) -> int:
    return len(re.findall(rf'"GET /v2/[^ ]*/blobs/{digest}', upstream.registry.log_text()))


class Cluster:
    """Replicas of regproxy on one bucket, each with a local tier of its own."""

    def __init__(self, start_proxy: Any, rgw: RGWServer, upstream: SeededRegistry, tmp: Path):
        self.start_proxy = start_proxy
        self.rgw = rgw
        self.upstream = upstream
        self.tmp = tmp
        self.bucket = rgw.new_bucket()
        self.replicas: list[Any] = []

    def replica(
        self, *extra: str, env: dict[str, str] | None = None, upstream: str | None = None
    ) -> Any:
        number = len(self.replicas)
        proxy = self.start_proxy(
            [
                "--upstream",
                upstream or self.upstream.url,
                "--cache-store",
                f"s3://{self.bucket}/cache",
                "--cache-dir",
                str(self.tmp / f"tier{number}"),
                *extra,
            ],
            env={**self.rgw.env(), **(env or {})},
        )
        self.replicas.append(proxy)
        return proxy

    def keys(self, prefix: str = "cache/blobs/") -> list[str]:
        client: Any = self.rgw.client()
        return [o.object_name for o in client.list_objects(self.bucket, prefix, recursive=True)]

    def check_every_object(self) -> int:
        """Hash every final key: each holds exactly the bytes its name says."""
        client: Any = self.rgw.client()
        keys = self.keys()
        for key in keys:
            response = client.get_object(self.bucket, key)
            try:
                hasher = hashlib.sha256()
                for chunk in response.stream(1 << 20):
                    hasher.update(chunk)
            finally:
                response.close()
                response.release_conn()
            assert hasher.hexdigest() == key.rsplit("/", 1)[1], key
        return len(keys)


@pytest.fixture
def cluster(start_proxy: Any, rgw: RGWServer, upstream: SeededRegistry, tmp: Path) -> Cluster:
    return Cluster(start_proxy, rgw, upstream, tmp)


def test_a_pull_through_another_replica_asks_the_upstream_for_no_content(
    cluster: Cluster, upstream: SeededRegistry, tmp: Path
) -> None:
    first = cluster.replica()
    for ref in ("app:v1", "big:v1"):
        result = skopeo_copy(f"{first.host_port}/{ref}", tmp / f"first-{ref}", tag="v1")
        assert result.digest == upstream[ref]
    # Completed uploads and index writes are in the store once the pull is over.
    eventually(lambda: len(cluster.keys()) >= 5, 10, what="objects in the store")
    eventually(lambda: cluster.keys("cache/leases/") == [], 10, what="leases released")
    assert cluster.check_every_object() >= 5
    before = upstream_gets(upstream, "sha256")
    second = cluster.replica()
    for ref in ("app:v1", "big:v1"):
        result = skopeo_copy(f"{second.host_port}/{ref}", tmp / f"second-{ref}", tag="v1")
        assert result.digest == upstream[ref]
    # Tags are revalidated (HEAD); nothing by digest was fetched again.
    assert upstream_gets(upstream, "sha256") == before
    second.stop()
    outcomes = {e.get("cache") for e in second.log_events() if e.get("endpoint") == "blob"}
    assert outcomes == {"hit"}


def test_ranges_of_a_blob_from_the_store(
    cluster: Cluster, upstream: SeededRegistry, tmp: Path
) -> None:
    first = cluster.replica()
    skopeo_copy(f"{first.host_port}/big:v1", tmp / "warm", tag="v1")
    eventually(lambda: cluster.keys("cache/leases/") == [], 10, what="leases released")
    layer = max(
        cluster.rgw.client().list_objects(  # type: ignore[attr-defined]
            cluster.bucket, "cache/blobs/", recursive=True
        ),
        key=lambda o: o.size,
    )
    digest = "sha256:" + layer.object_name.rsplit("/", 1)[1]
    second = cluster.replica()
    before = upstream_gets(upstream, "sha256")
    # A range first: the object is read into the tier (never streamed whole past it).
    part = curl(f"{second.url}/v2/big/blobs/{digest}", "-H", "Range: bytes=10-99")
    whole = curl(f"{second.url}/v2/big/blobs/{digest}")
    assert whole.status == 200 and hashlib.sha256(whole.body).hexdigest() == digest[7:]
    assert part.status == 206 and part.body == whole.body[10:100]
    assert part.header("Content-Range") == f"bytes 10-99/{len(whole.body)}"
    assert upstream_gets(upstream, "sha256") == before


def largest_blob(cluster: Cluster) -> Any:
    client: Any = cluster.rgw.client()
    return max(
        client.list_objects(cluster.bucket, "cache/blobs/", recursive=True), key=lambda o: o.size
    )


def test_a_first_hit_streams_past_the_local_tier_and_a_second_one_keeps_it(
    cluster: Cluster, tmp: Path
) -> None:
    first = cluster.replica()
    skopeo_copy(f"{first.host_port}/big:v1", tmp / "warm", tag="v1")
    eventually(lambda: cluster.keys("cache/leases/") == [], 10, what="leases released")
    hex_ = largest_blob(cluster).object_name.rsplit("/", 1)[1]
    second = cluster.replica("--cache-max-size", "1G")  # a bound: serves are recorded
    kept = tmp / "tier1" / "blobs" / "sha256" / hex_[:2] / hex_
    url = f"{second.url}/v2/big/blobs/sha256:{hex_}"
    once = curl(url)
    assert once.status == 200 and hashlib.sha256(once.body).hexdigest() == hex_
    assert not kept.exists()  # straight from the store to the client
    # Served, for the least-recently-served order, like every other hit.
    served = f"cache/index/served/{hex_}"
    eventually(lambda: served in cluster.keys("cache/index/served/"), 10, what="served record")
    again = curl(url)
    assert again.status == 200 and again.body == once.body
    eventually(kept.exists, 10, what="a blob asked for again kept in the local tier")
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == hex_


def test_wrong_bytes_in_the_store_never_reach_a_client_whole(cluster: Cluster, tmp: Path) -> None:
    first = cluster.replica()
    skopeo_copy(f"{first.host_port}/big:v1", tmp / "warm", tag="v1")
    eventually(lambda: cluster.keys("cache/leases/") == [], 10, what="leases released")
    layer = largest_blob(cluster)
    hex_ = layer.object_name.rsplit("/", 1)[1]
    wrong = bytes(layer.size)  # the right length, the wrong bytes
    client: Any = cluster.rgw.client()
    client.put_object(cluster.bucket, layer.object_name, io.BytesIO(wrong), len(wrong))
    second = cluster.replica()
    url = f"{second.url}/v2/big/blobs/sha256:{hex_}"
    for _ in range(2):  # streamed past the tier, then read into it: neither whole
        got = curl(url, cut_ok=True)
        assert not got.complete and len(got.body) < layer.size


def test_twenty_clients_on_three_replicas_cost_one_upstream_get(
    cluster: Cluster, upstream: SeededRegistry, tmp: Path
) -> None:
    image = build_image(tmp / "cold", layers=(24 * 1024 * 1024,), tag="cold", compress=False)
    push(tmp / "cold", "cold", f"{upstream.host_port}/cold:v1")
    layer = image.layers[0]
    replicas = [cluster.replica() for _ in range(3)]

    def fetch(number: int) -> str:
        proxy = replicas[number % 3]
        answer = curl(f"{proxy.url}/v2/cold/blobs/{layer.digest}")
        assert answer.status == 200, answer.body[:200]
        return hashlib.sha256(answer.body).hexdigest()

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        digests = list(pool.map(fetch, range(20)))
    assert set(digests) == {layer.digest[7:]}
    assert blob_gets(upstream, layer.digest) == 1
    assert cluster.check_every_object() == 1


def test_a_killed_leaseholder_is_taken_over(
    cluster: Cluster, upstream: SeededRegistry, tmp: Path
) -> None:
    image = build_image(tmp / "cold", layers=(8 * 1024 * 1024,), tag="cold", compress=False)
    push(tmp / "cold", "cold", f"{upstream.host_port}/cold:v1")
    layer = image.layers[0]
    # An upstream at 2 MB/s: the leaseholder is surely mid-download when it is killed,
    # however fast or slow the machine (8 MiB take about four seconds).
    relay = SlowRelay(upstream.registry.port, 2e6)
    try:
        slow_upstream = f"http://127.0.0.1:{relay.port}"
        env = {"REGPROXY_CACHE_LEASE_TTL": "2"}
        holder = cluster.replica(env=env, upstream=slow_upstream)
        other = cluster.replica(env=env, upstream=slow_upstream)
        since = time.monotonic()
        first = concurrent.futures.ThreadPoolExecutor(1).submit(
            curl, f"{holder.url}/v2/cold/blobs/{layer.digest}", cut_ok=True
        )
        eventually(lambda: cluster.keys("cache/leases/") != [], 10, what="a lease")
        eventually(
            lambda: relay.answers_since(layer.digest, since) != [],
            10,
            what="the leaseholder's download under way",
        )
        waiting = concurrent.futures.ThreadPoolExecutor(1).submit(
            curl, f"{other.url}/v2/cold/blobs/{layer.digest}", timeout=60
        )
        holder.send_signal(signal.SIGKILL)
        answer = waiting.result(timeout=90)
        assert answer.status == 200
        assert hashlib.sha256(answer.body).hexdigest() == layer.digest[7:]
        # Cut off with its replica (before or after its headers): never a whole body.
        try:
            cut = first.result(timeout=30).body
        except AssertionError:  # curl: no answer at all
            cut = b""
        assert hashlib.sha256(cut).hexdigest() != layer.digest[7:]
        # The taker's upload completes just after its client has the last byte.
        eventually(lambda: cluster.check_every_object() == 1, 20, what="the object stored")
        # Two upstream GETs, the killed holder's and the taker's: counted where they pass
        # (the registry logs the holder's cut request only once it notices, if ever).
        assert len(relay.answers_since(layer.digest, since)) == 2
    finally:
        relay.close()


def test_the_store_cut_mid_run_pulls_go_on(
    cluster: Cluster, upstream: SeededRegistry, tmp: Path
) -> None:
    with TCPRelay(("127.0.0.1", cluster.rgw.rgw_port)) as relay:
        proxy = cluster.replica(env={"AWS_ENDPOINT_URL": relay.endpoint})
        assert (
            skopeo_copy(f"{proxy.host_port}/app:v1", tmp / "a", tag="v1").digest
            == (upstream["app:v1"])
        )
        eventually(lambda: cluster.keys("cache/leases/") == [], 10, what="leases released")
        assert cluster.keys() != []
        relay.cut()
        for ref in ("big:v1", "app:v1", "team/app:v1"):
            result = skopeo_copy(f"{proxy.host_port}/{ref}", tmp / f"cut-{ref}", tag="v1")
            assert result.digest == upstream[ref]
    proxy.stop()
    warnings = [m for m in proxy.log_messages() if "object store" in m and "failing" in m]
    assert 1 <= len(warnings) <= 3, warnings  # once per streak, not once per request
    assert cluster.check_every_object() >= 1


def test_an_unreachable_store_fails_no_pull(
    cluster: Cluster, upstream: SeededRegistry, tmp: Path
) -> None:
    proxy = cluster.replica(env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})  # nothing there
    result = skopeo_copy(f"{proxy.host_port}/app:v1", tmp / "down", tag="v1")
    assert result.digest == upstream["app:v1"]
    proxy.stop()
    warnings = [m for m in proxy.log_messages() if "object store" in m and "failing" in m]
    assert 1 <= len(warnings) <= 2  # logged once per streak, not per request


def test_blob_redirects_to_the_store(
    cluster: Cluster, upstream: SeededRegistry, tmp: Path
) -> None:
    first = cluster.replica()
    skopeo_copy(f"{first.host_port}/big:v1", tmp / "warm", tag="v1")
    eventually(lambda: cluster.keys("cache/leases/") == [], 10, what="leases released")
    before = upstream_gets(upstream, "sha256")
    redirecting = cluster.replica("--blob-redirects", "store")
    result = skopeo_copy(f"{redirecting.host_port}/big:v1", tmp / "redirected", tag="v1")
    assert result.digest == upstream["big:v1"]
    assert upstream_gets(upstream, "sha256") == before
    layer = max(
        cluster.rgw.client().list_objects(cluster.bucket, "cache/blobs/", recursive=True),  # type: ignore[attr-defined]
        key=lambda o: o.size,
    )
    digest = "sha256:" + layer.object_name.rsplit("/", 1)[1]
    answer = curl(f"{redirecting.url}/v2/big/blobs/{digest}")
    assert answer.status == 307 and answer.body == b""
    location = answer.header("Location") or ""
    assert location.startswith(cluster.rgw.endpoint + f"/{cluster.bucket}/cache/blobs/")
    assert "X-Amz-Expires=300" in location and "X-Amz-Signature=" in location
    followed = curl(location)
    assert hashlib.sha256(followed.body).hexdigest() == digest[7:]
    # Manifests are always served by the proxy.
    manifest = curl(f"{redirecting.url}/v2/big/manifests/{upstream['big:v1']}")
    assert manifest.status == 200
    redirecting.stop()
    blobs = [e for e in redirecting.log_events() if e.get("endpoint") == "blob"]
    assert blobs and {e.get("status") for e in blobs} == {307}
