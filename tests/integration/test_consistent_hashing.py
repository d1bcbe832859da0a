"""Each blob fetched once per cluster without a shared store: nginx hashing requests to
three regproxy replicas, each with a disk cache of its own (docs/consistent-hashing.rst).

nginx runs the documented example (deploy/nginx/regproxy-consistent-hash.conf) with only
its addresses replaced; the upstream is a real registry whose access log counts the
requests that reached it, and nginx's log names the replica that answered each request.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.curl import curl
from tests.support.images import ImageInfo, build_image, push
from tests.support.nginx import Nginx, nginx_binary
from tests.support.proxy import RegproxyProcess
from tests.support.registry import RegistryServer
from tests.support.tools import require_tools
from tests.support.waiting import eventually

require_tools([] if nginx_binary() else ["nginx (Debian package nginx-light)"], "nginx")

REPLICAS = 3


@pytest.fixture
def upstream(tmp: Path) -> Iterator[RegistryServer]:
    with RegistryServer(
        directory=tmp / "upstream",
        extra_config={"log": {"level": "info", "accesslog": {"disabled": False}}},
    ) as server:
        yield server


def upstream_requests(registry: RegistryServer, method: str, path: str) -> int:
    return len(re.findall(rf'"{method} {re.escape(path)} ', registry.log_text()))


def upstream_blob_gets(registry: RegistryServer, digest: str) -> int:
    return len(re.findall(rf'"GET /v2/[^ ]*/blobs/{digest} ', registry.log_text()))


@pytest.fixture
def replicas(start_proxy, upstream: RegistryServer, tmp: Path) -> list[RegproxyProcess]:
    """Three replicas, each with a cache directory of its own, believing X-Forwarded-For
    from nginx only (it connects from 127.0.0.1)."""
    return [
        start_proxy(
            [
                "--upstream",
                upstream.url,
                "--cache-dir",
                str(tmp / f"cache{number}"),
                "--trusted-proxy",
                "127.0.0.1/32",
            ]
        )
        for number in range(REPLICAS)
    ]


BalancerFactory = Callable[..., Nginx]


@pytest.fixture
def start_balancer(tmp: Path) -> Iterator[BalancerFactory]:
    """``start_balancer(replicas, hashed=True) -> Nginx`` started; all stopped at teardown."""
    started: list[Nginx] = []

    def start(replicas: list[RegproxyProcess], hashed: bool = True) -> Nginx:
        servers = [replica.host_port for replica in replicas]
        balancer = Nginx.in_front_of(servers, tmp / f"nginx{len(started)}", hashed=hashed)
        started.append(balancer)
        return balancer.start()

    try:
        yield start
    finally:
        for balancer in started:
            balancer.stop()


@pytest.fixture
def balancer(start_balancer: BalancerFactory, replicas: list[RegproxyProcess]) -> Nginx:
    return start_balancer(replicas)


def pushed(upstream: RegistryServer, tmp: Path, size: int, *names: str) -> ImageInfo:
    """A one-layer image of *size* random bytes, pushed under each of *names* (tag v1)."""
    image = build_image(tmp / "layout", layers=(size,), tag="v1", compress=False)
    for name in names:
        push(tmp / "layout", "v1", f"{upstream.host_port}/{name}:v1")
    return image


def fetch_digest(url: str, *curl_args: str) -> str:
    """GET *url* with curl and hash the body as it arrives (no file)."""
    with subprocess.Popen(
        ["curl", "-sS", "-f", "--noproxy", "*", *curl_args, url], stdout=subprocess.PIPE
    ) as process:
        assert process.stdout is not None
        digest = hashlib.sha256()
        while chunk := process.stdout.read(1 << 20):
            digest.update(chunk)
    assert process.returncode == 0, f"curl {url} exited with {process.returncode}"
    return "sha256:" + digest.hexdigest()


def answered_by(balancer: Nginx, path: str, count: int) -> list[str]:
    """The replica that answered each of the *count* requests for *path* (nginx writes a
    request's line after its last byte went out: it may come just after the client's end)."""

    def logged() -> list[str]:
        found = [replica for _, line, _, replica, _ in balancer.requests() if line == path]
        return found if len(found) >= count else []

    return eventually(logged, 10, what=f"{count} access lines for {path}")


def test_twenty_clients_on_a_cold_blob_cost_one_upstream_get(
    upstream: RegistryServer, balancer: Nginx, tmp: Path
) -> None:
    image = pushed(upstream, tmp, 32 * 1024 * 1024, "cold")
    digest = image.layers[0].digest
    path = f"/v2/cold/blobs/{digest}"
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        digests = list(pool.map(lambda _: fetch_digest(balancer.url + path), range(20)))
    assert digests == [digest] * 20
    assert upstream_blob_gets(upstream, digest) == 1
    # Every client reached the same replica, chosen by the digest.
    assert len(set(answered_by(balancer, path, 20))) == 1
    assert {key for *_, logged, _, _, key in balancer.requests() if logged == path} == {digest}


def test_one_blob_under_many_repository_names_is_fetched_once(
    upstream: RegistryServer, balancer: Nginx, tmp: Path
) -> None:
    """Keyed by the digest, not the path: a layer shared by repositories stays on one
    replica (keyed by the path, six names would land on all three replicas)."""
    names = [f"team{number}/app" for number in range(6)]
    image = pushed(upstream, tmp, 1024 * 1024, *names)
    digest = image.layers[0].digest
    hex_ = digest.split(":")[1]
    committed = [tmp / f"cache{n}" / "blobs" / "sha256" / hex_[:2] / hex_ for n in range(3)]
    for name in names:
        assert fetch_digest(f"{balancer.url}/v2/{name}/blobs/{digest}") == digest
        # Another repository's request while the download is still being verified and
        # committed (after its client's last byte) is passed through, not joined: wait
        # until one replica holds the blob, as a later pull would find it.
        eventually(lambda: any(path.exists() for path in committed), 10, what="the blob stored")
    assert upstream_blob_gets(upstream, digest) == 1
    replicas = {
        replica
        for name in names
        for replica in answered_by(balancer, f"/v2/{name}/blobs/{digest}", 1)
    }
    assert len(replicas) == 1


def test_keys_spread_over_the_replicas_and_stay_put(
    upstream: RegistryServer, balancer: Nginx, replicas: list[RegproxyProcess]
) -> None:
    digests = ["sha256:" + os.urandom(32).hex() for _ in range(24)]
    paths = [f"/v2/app/blobs/{digest}" for digest in digests]
    paths += [f"/v2/app{number}/manifests/v1" for number in range(6)]
    for _ in range(2):
        for path in paths:
            assert curl(balancer.url + path, "-I").status == 404  # never pushed
        # containerd as a mirror adds ?ns=...: the key is the path without the query.
        assert curl(balancer.url + paths[-1] + "?ns=docker.io", "-I").status == 404
    # The last path was asked for twice more, with ?ns= (the log shows $uri, no query).
    chosen = {path: answered_by(balancer, path, 2 + 2 * (path == paths[-1])) for path in paths}
    assert all(len(set(replica)) == 1 for replica in chosen.values()), chosen
    used = {replica[0] for replica in chosen.values()}
    assert used <= {replica.host_port for replica in replicas}
    assert len(used) > 1, "every key on one replica: the hash is not spreading"
    keys = {logged: key for _, logged, _, _, key in balancer.requests()}
    assert keys[paths[0]] == digests[0]
    assert keys[paths[-1]] == paths[-1]
    assert upstream_requests(upstream, "HEAD", paths[0]) == 2  # misses are not remembered


def test_removing_a_replica_moves_only_its_keys(
    upstream: RegistryServer,
    start_balancer: BalancerFactory,
    replicas: list[RegproxyProcess],
) -> None:
    """A consistent hash: when a replica leaves, the keys of the others stay where they
    are (their caches stay warm); only the leaver's keys move."""
    paths = [f"/v2/app/blobs/sha256:{os.urandom(32).hex()}" for _ in range(60)]

    def placement(balancer: Nginx) -> dict[str, str]:
        for path in paths:
            assert curl(balancer.url + path, "-I").status == 404
        return {path: answered_by(balancer, path, 1)[0] for path in paths}

    before = placement(start_balancer(replicas))
    leaver = replicas[-1].host_port
    after = placement(start_balancer(replicas[:-1]))
    moved = {path for path in paths if before[path] != after[path]}
    assert moved == {path for path in paths if before[path] == leaver}
    assert 0 < len(moved) < len(paths)


def test_the_client_address_is_the_one_nginx_saw(
    balancer: Nginx, replicas: list[RegproxyProcess]
) -> None:
    """nginx replaces the client's X-Forwarded-For with the address it saw; the replica
    believes it because nginx's address is its --trusted-proxy."""
    answer = curl(
        balancer.url + "/v2/", "--interface", "127.0.0.3", "-H", "X-Forwarded-For: 203.0.113.7"
    )
    assert answer.status == 200
    clients = []
    for replica in replicas:
        replica.stop()
        clients += [e["client"] for e in replica.log_events() if e.get("path") == "/v2/"]
    assert clients == ["127.0.0.3"]
