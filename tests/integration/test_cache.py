"""The pull-through cache with a real distribution registry upstream and real clients.

Each test has a registry of its own with its access log on, so the requests that reached
the upstream can be counted there; storage is the registry's filesystem driver, so a blob
can be corrupted on purpose.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.curl import curl
from tests.support.images import build_image, push, skopeo_copy
from tests.support.registry import RegistryServer
from tests.support.seed import SeededRegistry, StandardImages, seed_registry
from tests.support.waiting import eventually

OCI_ACCEPT = "Accept: application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
def upstream(tmp: Path, standard_images: StandardImages) -> Iterator[SeededRegistry]:
    with RegistryServer(
        directory=tmp / "upstream",
        extra_config={"log": {"level": "info", "accesslog": {"disabled": False}}},
    ) as server:
        yield seed_registry(server, standard_images)


def upstream_gets(upstream: SeededRegistry, kind: str = "") -> int:
    """GETs of blobs and manifests the upstream answered, from its own access log."""
    pattern = rf'"GET /v2/[^ ]*/(?:blobs|manifests)/{kind}'
    return len(re.findall(pattern, upstream.registry.log_text()))


def cached_proxy(start_proxy, upstream: SeededRegistry, cache: Path, *extra: str):
    return start_proxy(["--upstream", upstream.url, "--cache-dir", str(cache), *extra])


def test_a_second_pull_makes_no_upstream_get(
    start_proxy, upstream: SeededRegistry, tmp: Path
) -> None:
    proxy = cached_proxy(start_proxy, upstream, tmp / "cache")
    refs = ["app:v1", "team/app:v1", "multi:v1", "big:v1"]
    for number, ref in enumerate(refs):
        extra = ["--all"] if ref.startswith("multi") else []
        result = skopeo_copy(f"{proxy.host_port}/{ref}", tmp / f"first{number}", extra, tag="v1")
        assert result.digest == upstream[ref]
    before = upstream_gets(upstream)
    assert before > 0
    for number, ref in enumerate(refs):
        extra = ["--all"] if ref.startswith("multi") else []
        result = skopeo_copy(f"{proxy.host_port}/{ref}", tmp / f"again{number}", extra, tag="v1")
        assert result.digest == upstream[ref]
    # Tags were revalidated with HEADs (free on Docker Hub); nothing was downloaded again.
    assert upstream_gets(upstream) == before
    # What the cache served reaches /metrics (it once counted into nothing).
    metrics = curl(proxy.url + "/metrics").body.decode()
    served = re.search(
        r'regproxy_cache_events_total\{name="bytes_from_cache"\} ([0-9.e+]+)', metrics
    )
    assert served is not None and float(served.group(1)) > 0
    proxy.stop()
    outcomes = {e.get("cache") for e in proxy.log_events() if e.get("endpoint") == "blob"}
    assert {"miss", "hit"} <= outcomes


def test_pulls_survive_an_upstream_outage(
    start_proxy, upstream: SeededRegistry, tmp: Path
) -> None:
    proxy = cached_proxy(start_proxy, upstream, tmp / "cache")
    skopeo_copy(f"{proxy.host_port}/app:v1", tmp / "warm", tag="v1")
    # A tag resolves per Accept: warm this client's resolution too.
    assert curl(proxy.url + "/v2/app/manifests/v1", "-H", OCI_ACCEPT).header("Warning") is None
    upstream.registry.stop()
    by_tag = skopeo_copy(f"{proxy.host_port}/app:v1", tmp / "by-tag", tag="v1")
    assert by_tag.digest == upstream["app:v1"]
    digest = upstream["app:v1"]
    by_digest = skopeo_copy(f"{proxy.host_port}/app@{digest}", tmp / "by-digest", tag="v1")
    assert by_digest.digest == digest
    answer = curl(proxy.url + "/v2/app/manifests/v1", "-H", OCI_ACCEPT)
    assert answer.status == 200
    assert answer.header("Warning") == '110 - "Response is Stale"'
    assert hashlib.sha256(answer.body).hexdigest() == digest.split(":")[1]
    head = curl(proxy.url + "/v2/app/manifests/v1", "-I", "-H", OCI_ACCEPT)
    assert head.status == 200 and head.header("Docker-Content-Digest") == digest
    unknown = curl(proxy.url + "/v2/app/manifests/never-pushed")
    assert unknown.status in (502, 504)
    assert unknown.error_codes() in (["UPSTREAM_UNAVAILABLE"], ["UPSTREAM_TIMEOUT"])
    proxy.stop()
    assert any(e.get("cache") == "stale" for e in proxy.log_events())


def test_twenty_clients_on_a_cold_blob_cost_one_upstream_get(
    start_proxy, upstream: SeededRegistry, tmp: Path
) -> None:
    image = build_image(tmp / "cold", layers=(8 * 1024 * 1024,), tag="cold", compress=False)
    push(tmp / "cold", "cold", f"{upstream.host_port}/cold:v1")
    layer = image.layers[0]
    proxy = cached_proxy(start_proxy, upstream, tmp / "cache")
    url = f"{proxy.url}/v2/cold/blobs/{layer.digest}"
    before = upstream_gets(upstream, "sha256")

    def fetch(number: int) -> str:
        out = tmp / f"client{number}"
        subprocess.run(["curl", "-sS", "-f", "-o", str(out), url], check=True, timeout=120)
        digest = "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()
        out.unlink()
        return digest

    # A client that has its answer's first bytes and then stops reading (as slow as can
    # be): the other nineteen must not wait for it.
    slow = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    slow.request("GET", f"/v2/cold/blobs/{layer.digest}")
    answer = slow.getresponse()
    hasher = hashlib.sha256(answer.read(64 * 1024))
    with concurrent.futures.ThreadPoolExecutor(max_workers=19) as pool:
        fast = [pool.submit(fetch, n) for n in range(19)]
        assert [f.result() for f in fast] == [layer.digest] * 19
    hasher.update(answer.read())  # it reads on now, and gets every byte
    slow.close()
    assert "sha256:" + hasher.hexdigest() == layer.digest
    assert upstream_gets(upstream, "sha256") - before == 1


def corrupt_blob(upstream: SeededRegistry, digest: str) -> None:
    hex_ = digest.split(":")[1]
    data = (
        upstream.registry.directory
        / "storage/docker/registry/v2/blobs/sha256"
        / hex_[:2]
        / hex_
        / "data"
    )
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0xFF
    data.write_bytes(bytes(content))


def test_a_corrupt_upstream_blob_is_never_served_whole_nor_kept(
    start_proxy, upstream: SeededRegistry, standard_images: StandardImages, tmp: Path
) -> None:
    layer = standard_images.big.layers[0]
    corrupt_blob(upstream, layer.digest)
    proxy = cached_proxy(start_proxy, upstream, tmp / "cache")
    for attempt in range(2):
        out = tmp / f"corrupt{attempt}"
        result = subprocess.run(
            ["curl", "-sS", "-o", str(out), f"{proxy.url}/v2/big/blobs/{layer.digest}"],
            timeout=60,
        )
        # Cut off before the last byte: curl sees a transfer that ended early.
        assert result.returncode in (18, 52, 56), result.returncode
        assert out.stat().st_size < layer.size
    stored = list((tmp / "cache").glob(f"blobs/sha256/*/{layer.digest.split(':')[1]}"))
    assert stored == []
    assert upstream_gets(upstream, "sha256") >= 2  # nothing kept: fetched again
    proxy.stop()
    assert any(e.get("error_kind") == "digest_mismatch" for e in proxy.log_events())


def test_kill_9_mid_download_leaves_nothing_partial(
    start_proxy, upstream: SeededRegistry, tmp: Path
) -> None:
    image = build_image(tmp / "huge", layers=(48 * 1024 * 1024,), tag="huge", compress=False)
    push(tmp / "huge", "huge", f"{upstream.host_port}/huge:v1")
    layer = image.layers[0]
    proxy = cached_proxy(start_proxy, upstream, tmp / "cache")
    with socket.create_connection(("127.0.0.1", proxy.port)) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.sendall(f"GET /v2/huge/blobs/{layer.digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert client.recv(65536).startswith(b"HTTP/1.1 200")
        os.kill(proxy.pid, signal.SIGKILL)
        eventually(lambda: not proxy.running)
    again = cached_proxy(start_proxy, upstream, tmp / "cache")
    before = upstream_gets(upstream, "sha256")
    out = tmp / "whole"
    subprocess.run(
        ["curl", "-sSf", "-o", str(out), f"{again.url}/v2/huge/blobs/{layer.digest}"],
        check=True,
        timeout=60,
    )
    assert "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest() == layer.digest
    assert upstream_gets(upstream, "sha256") == before + 1  # downloaded anew


def test_two_processes_share_one_cache_directory(
    start_proxy, upstream: SeededRegistry, tmp: Path
) -> None:
    first = cached_proxy(start_proxy, upstream, tmp / "cache")
    second = cached_proxy(start_proxy, upstream, tmp / "cache")
    refs = ["app:v1", "team/app:v1", "big:v1"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        jobs = [
            pool.submit(
                skopeo_copy,
                f"{proxy.host_port}/{ref}",
                tmp / f"{n}-{i}",
                [],
                None,
                False,
                None,
                "v1",
            )
            for i, proxy in enumerate((first, second, first, second))
            for n, ref in enumerate(refs)
        ]
        results = [job.result() for job in jobs]
    assert [r.digest for r in results] == [upstream[ref] for _ in range(4) for ref in refs]
    # Both read what is stored, intact.
    for proxy in (first, second):
        for ref in refs:
            assert (
                skopeo_copy(f"{proxy.host_port}/{ref}", tmp / "check", tag="v1").digest
                == (upstream[ref])
            )


def test_eviction_keeps_the_bound_while_clients_read(
    start_proxy, upstream: SeededRegistry, tmp: Path
) -> None:
    proxy = cached_proxy(start_proxy, upstream, tmp / "cache", "--cache-max-size", "10M")
    for round_ in range(2):
        for ref in ("big:v1", "app:v1", "team/app:v1"):
            result = skopeo_copy(f"{proxy.host_port}/{ref}", tmp / f"e{round_}{ref}", tag="v1")
            assert result.digest == upstream[ref]
    stored = sum(p.stat().st_size for p in (tmp / "cache" / "blobs").rglob("*") if p.is_file())
    assert stored <= 10 * 1024 * 1024 * 1.05


def test_a_cached_blob_is_no_way_around_the_upstreams_authorization(
    start_proxy,
    prefixed_private_token_registry: SeededRegistry,
    proxy_credentials: tuple[str, str],
    tmp: Path,
) -> None:
    """Clients bring their own credentials: the upstream decides who reads, cache or not."""
    registry = prefixed_private_token_registry
    proxy = start_proxy(
        ["--upstream", registry.url, "--repo-prefix", "proj", "--cache-dir", str(tmp / "cache")]
    )
    allowed = skopeo_copy(f"{proxy.host_port}/app:v1", tmp / "a", creds=proxy_credentials)
    assert allowed.digest == registry["app:v1"]
    layer = registry.images.app.layers[0].digest
    # Cached now; a client without credentials still gets exactly the upstream's answer.
    refused = curl(f"{proxy.url}/v2/app/blobs/{layer}")
    assert refused.status == 401
    assert refused.header("WWW-Authenticate") is not None
    # The client with access gets it from the cache.
    again = skopeo_copy(f"{proxy.host_port}/app:v1", tmp / "b", creds=proxy_credentials)
    assert again.digest == registry["app:v1"]
    proxy.stop()
    blob_events = [e for e in proxy.log_events() if e.get("path") == f"/v2/app/blobs/{layer}"]
    assert [e.get("status") for e in blob_events if e.get("cache") == "hit"] == [200]
    assert any(e.get("status") == 401 for e in blob_events)


def test_concurrent_requests_for_a_tag_cost_one_upstream_head(
    start_proxy, upstream: SeededRegistry, tmp: Path
) -> None:
    proxy = cached_proxy(start_proxy, upstream, tmp / "cache")
    url = proxy.url + "/v2/app/manifests/v1"
    assert curl(url, "-H", OCI_ACCEPT).status == 200  # warm: the manifest is stored

    def heads() -> int:
        return len(re.findall(r'"HEAD /v2/app/manifests/v1 ', upstream.registry.log_text()))

    before = heads()
    # Thirty requests at the same moment: connections open first, then every request sent.
    request = (
        "GET /v2/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"{OCI_ACCEPT}\r\n\r\n"
    ).encode()
    clients = [socket.create_connection(("127.0.0.1", proxy.port), timeout=20) for _ in range(30)]
    try:
        for client in clients:
            client.sendall(request)
        answers = []
        for client in clients:
            data = b""
            while chunk := client.recv(65536):
                data += chunk
            answers.append(data)
    finally:
        for client in clients:
            client.close()
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
    assert all(upstream["app:v1"].encode() in a for a in answers)
    # Coalesced: far fewer HEADs than requests (one per burst that overlaps).
    assert heads() - before <= 3
    metrics = curl(proxy.url + "/metrics").body.decode()
    assert 'regproxy_cache_requests_total{outcome="hit",route="default"}' in metrics


def test_two_processes_fetch_a_cold_blob_from_the_upstream_once(
    start_proxy, upstream: SeededRegistry, tmp: Path
) -> None:
    image = build_image(tmp / "shared", layers=(8 * 1024 * 1024,), tag="shared", compress=False)
    push(tmp / "shared", "shared", f"{upstream.host_port}/shared:v1")
    layer = image.layers[0]
    proxies = [cached_proxy(start_proxy, upstream, tmp / "cache") for _ in range(2)]
    before = upstream_gets(upstream, "sha256")

    def fetch(number: int) -> str:
        out = tmp / f"shared{number}"
        url = f"{proxies[number % 2].url}/v2/shared/blobs/{layer.digest}"
        subprocess.run(["curl", "-sSf", "-o", str(out), url], check=True, timeout=120)
        return "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        digests = list(pool.map(fetch, range(6)))
    assert digests == [layer.digest] * 6
    assert upstream_gets(upstream, "sha256") - before == 1
