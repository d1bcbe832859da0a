"""The core proxy against a real distribution registry, pulled with skopeo and curl."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest

from tests.support.curl import curl, head_has_no_body
from tests.support.images import (
    skopeo_copy,
    skopeo_inspect_bytes,
    skopeo_list_tags,
    verify_layout,
)
from tests.support.ports import free_port
from tests.support.registry import RegistryServer
from tests.support.seed import SeededRegistry
from tests.support.waiting import eventually

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@pytest.fixture
def proxy(start_proxy, prefixed_registry: SeededRegistry):
    return start_proxy(["--upstream", prefixed_registry.url, "--repo-prefix", "proj"])


@pytest.mark.parametrize("ref", ["app:v1", "team/app:v1", "big:v1"])
def test_pull_through_prefix(
    proxy, prefixed_registry: SeededRegistry, tmp: Path, ref: str
) -> None:
    result = skopeo_copy(f"docker://{proxy.host_port}/{ref}", tmp / "out")
    assert result.digest == prefixed_registry[ref]
    assert verify_layout(tmp / "out", prefixed_registry[ref]) == prefixed_registry[ref]


def test_pull_multiarch_index(proxy, prefixed_registry: SeededRegistry, tmp: Path) -> None:
    result = skopeo_copy(f"docker://{proxy.host_port}/multi:v1", tmp / "out", ["--all"])
    assert result.digest == prefixed_registry["multi:v1"]
    verify_layout(tmp / "out", prefixed_registry["multi:v1"])
    raw = skopeo_inspect_bytes(f"docker://{proxy.host_port}/multi:v1")
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == prefixed_registry["multi:v1"]


def test_list_tags_of_a_repository_with_hundreds(proxy, prefixed_registry: SeededRegistry) -> None:
    tags = skopeo_list_tags(f"docker://{proxy.host_port}/many")
    assert sorted(tags) == prefixed_registry.many_tags
    answer = curl(proxy.url + "/v2/many/tags/list")
    assert answer.json()["name"] == "many"  # not "proj/many"


def test_head_manifest_and_blob(proxy, prefixed_registry: SeededRegistry) -> None:
    manifest = curl(proxy.url + "/v2/app/manifests/v1", "-I", "-H", f"Accept: {OCI_MANIFEST}")
    assert manifest.status == 200
    assert manifest.header("Docker-Content-Digest") == prefixed_registry["app:v1"]
    assert int(manifest.header("Content-Length") or 0) > 0
    assert manifest.header("Docker-Distribution-API-Version") == "registry/2.0"
    assert head_has_no_body("127.0.0.1", proxy.port, "/v2/app/manifests/v1")
    layer = prefixed_registry["big:v1@layer"]
    blob = curl(proxy.url + f"/v2/big/blobs/{layer}", "-I")
    assert blob.status == 200
    assert blob.header("Docker-Content-Digest") == layer
    assert int(blob.header("Content-Length") or 0) > 8 * 1024 * 1024


def test_get_keeps_content_length_and_bytes(proxy, prefixed_registry: SeededRegistry) -> None:
    layer = prefixed_registry["big:v1@layer"]
    blob = curl(proxy.url + f"/v2/big/blobs/{layer}")
    assert blob.status == 200
    assert int(blob.header("Content-Length") or -1) == len(blob.body)
    assert "sha256:" + hashlib.sha256(blob.body).hexdigest() == layer


def test_range_passes_206(proxy, prefixed_registry: SeededRegistry) -> None:
    layer = prefixed_registry["big:v1@layer"]
    whole = curl(proxy.url + f"/v2/big/blobs/{layer}").body
    part = curl(proxy.url + f"/v2/big/blobs/{layer}", "-r", "100-1099")
    assert part.status == 206
    assert part.header("Content-Range") == f"bytes 100-1099/{len(whole)}"
    assert part.body == whole[100:1100]


def test_push_is_refused_and_nothing_reaches_the_upstream(
    proxy, prefixed_registry: SeededRegistry, tmp: Path
) -> None:
    from tests.support.images import push

    with pytest.raises(Exception):  # noqa: B017 - skopeo reports the refusal as a failure
        push(prefixed_registry.images.layout, "app", f"{proxy.host_port}/pushed:v1")
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        answer = curl(proxy.url + "/v2/pushed/blobs/uploads/", "-X", method)
        assert answer.status == 405
        assert answer.error_codes() == ["UNSUPPORTED"]
    answer = curl(proxy.url + "/v2/app/manifests/v1", "-X", "DELETE")
    assert answer.status == 405
    assert answer.header("Allow") == "GET, HEAD"
    upstream = curl(prefixed_registry.url + "/v2/proj/pushed/tags/list")
    assert upstream.status == 404


def test_unknown_repository_is_a_json_404(proxy) -> None:
    answer = curl(proxy.url + "/v2/does-not-exist/manifests/latest")
    assert answer.status == 404
    assert answer.error_codes() == ["MANIFEST_UNKNOWN"] or answer.error_codes() == ["NAME_UNKNOWN"]
    assert answer.header("Docker-Distribution-API-Version") == "registry/2.0"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/UPPER/manifests/v1", "NAME_INVALID"),
        ("/v2/a//b/manifests/v1", "NAME_INVALID"),
        ("/v2/app/../etc/manifests/v1", "NAME_INVALID"),
        ("/v2/app%2Fx/manifests/v1", "NAME_INVALID"),
        ("/v2/app/blobs/sha256:" + "0" * 63, "DIGEST_INVALID"),
        ("/v2/app/blobs/sha256:zz", "DIGEST_INVALID"),
        ("/v2/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", "DIGEST_INVALID"),
        ("/v2/app/blobs/latest", "DIGEST_INVALID"),
        ("/v2/app/tags/list?n=abc", "PAGINATION_NUMBER_INVALID"),
    ],
)
def test_invalid_input_is_a_json_400(proxy, path: str, code: str) -> None:
    answer = curl(proxy.url + path, "--path-as-is")
    assert answer.status == 400
    assert answer.error_codes() == [code]


@pytest.mark.parametrize(
    "reference", [".INVALID_MANIFEST_NAME", "-bad", "sha256:1234", "md5:" + "0" * 32]
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_impossible_manifest_reference_is_manifest_unknown(
    proxy, method: str, reference: str
) -> None:
    """Neither a tag nor a digest: 404 MANIFEST_UNKNOWN, as distribution answers and the
    OCI conformance suite expects, never a 400."""
    args = ["-I"] if method == "HEAD" else []
    answer = curl(proxy.url + "/v2/app/manifests/" + reference, *args)
    assert answer.status == 404
    if method == "GET":
        assert answer.error_codes() == ["MANIFEST_UNKNOWN"]
    else:
        assert answer.body == b""


def test_catalog_only_lists_the_prefix_and_paginates(proxy, prefixed_registry) -> None:
    names: list[str] = []
    url = proxy.url + "/v2/_catalog?n=2"
    for _ in range(20):
        answer = curl(url)
        assert answer.status == 200
        names.extend(answer.json()["repositories"])
        link = answer.header("Link")
        if not link:
            break
        assert "proj" not in link
        url = proxy.url + link[link.index("<") + 1 : link.index(">")]
    assert sorted(names) == ["app", "big", "many", "multi", "team/app"]


def test_upstream_down_is_a_json_502(start_proxy) -> None:
    proxy = start_proxy(["--upstream", f"http://127.0.0.1:{free_port()}"])
    answer = curl(proxy.url + "/v2/app/manifests/v1")
    assert answer.status == 502
    assert answer.error_codes() == ["UPSTREAM_UNAVAILABLE"]
    # Still serving afterwards.
    assert curl(proxy.url + "/v2/app/manifests/v1").status == 502


def test_browser_redirects(start_proxy, prefixed_registry: SeededRegistry) -> None:
    proxy = start_proxy(["--upstream", prefixed_registry.url, "--repo-prefix", "proj"])
    answer = curl(proxy.url + "/app")
    assert answer.status == 307
    # The upstream's own scheme: this one is plain http.
    assert answer.header("Location") == f"http://{prefixed_registry.host_port}/proj/app"
    disabled = start_proxy(
        ["--upstream", prefixed_registry.url], env={"DISABLE_BROWSER_REDIRECTS": "1"}
    )
    answer = curl(disabled.url + "/app")
    assert answer.status == 404
    assert answer.error_codes() == ["NOT_FOUND"]


def wait_for_upstream_check(proxy) -> None:
    """Let the start-up check of the upstream's /v2/ finish first.

    Its connection then waits in the pool and the next request reuses it, so the tests
    below see exactly one upstream connection: the one carrying their transfer.
    """
    eventually(lambda: "regproxy_upstream_up{" in curl(proxy.url + "/metrics").body.decode())


def _established(pid: int, remote_port: int) -> int:
    """Established TCP connections of process ``pid`` to 127.0.0.1:``remote_port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and inode in inodes and int(remote.split(":")[1], 16) == remote_port:
            count += 1
    return count


def test_client_disconnect_mid_blob_closes_the_upstream_transfer(
    start_proxy, registry: RegistryServer, standard_images, tmp: Path
) -> None:
    from tests.support.images import build_image, push

    image = build_image(tmp / "layout", layers=(96 * 1024 * 1024,), tag="huge", compress=False)
    push(tmp / "layout", "huge", f"{registry.host_port}/huge:v1")
    proxy = start_proxy(["--upstream", registry.url])
    wait_for_upstream_check(proxy)
    layer = image.layers[0].digest
    with socket.create_connection(("127.0.0.1", proxy.port)) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.sendall(f"GET /v2/huge/blobs/{layer} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        assert client.recv(65536).startswith(b"HTTP/1.1 200")
        # The client reads nothing more: backpressure holds the upstream connection open.
        eventually(lambda: _established(proxy.pid, registry.port) == 1)
    eventually(lambda: _established(proxy.pid, registry.port) == 0, timeout=5)
    assert proxy.running


@pytest.mark.parametrize(
    "value",
    [
        "bytes=0-1,2-3",
        "bytes=" + ",".join(["0-0"] * 200),
        "bytes=5-1",
        "bytes=-",
        "items=0-1",
        "bytes=abc-def",
    ],
)
def test_malformed_or_abusive_range_is_refused(proxy, prefixed_registry, value: str) -> None:
    layer = prefixed_registry["big:v1@layer"]
    answer = curl(proxy.url + f"/v2/big/blobs/{layer}", "-H", f"Range: {value}")
    assert answer.status == 416
    assert answer.error_codes() == ["RANGE_INVALID"]


def test_suffix_range_passes(proxy, prefixed_registry) -> None:
    layer = prefixed_registry["big:v1@layer"]
    whole = curl(proxy.url + f"/v2/big/blobs/{layer}").body
    tail = curl(proxy.url + f"/v2/big/blobs/{layer}", "-H", "Range: bytes=-100")
    assert tail.status == 206
    assert tail.body == whole[-100:]


def test_upstream_connections_are_pooled(start_proxy, prefixed_registry) -> None:
    proxy = start_proxy(["--upstream", prefixed_registry.url, "--repo-prefix", "proj"])
    for _ in range(10):
        answer = curl(proxy.url + "/v2/app/manifests/v1", "-H", f"Accept: {OCI_MANIFEST}")
        assert answer.status == 200
    # Ten sequential requests, one kept-alive upstream connection (plus, at most, the one
    # the periodic upstream check opened).
    assert 1 <= _established(proxy.pid, prefixed_registry.registry.port) <= 2


def test_a_client_that_stops_reading_is_dropped(
    start_proxy, registry: RegistryServer, tmp
) -> None:
    from tests.support.images import build_image, push

    image = build_image(tmp / "layout", layers=(48 * 1024 * 1024,), tag="s", compress=False)
    push(tmp / "layout", "s", f"{registry.host_port}/stall:v1")
    proxy = start_proxy(["--upstream", registry.url, "--idle-timeout", "1"])
    wait_for_upstream_check(proxy)
    client = socket.create_connection(("127.0.0.1", proxy.port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.sendall(
        f"GET /v2/stall/blobs/{image.layers[0].digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    try:
        # It reads nothing; within a few idle periods the proxy lets go of both sides.
        eventually(lambda: _established(proxy.pid, registry.port) == 0)

        def in_flight() -> float:
            metrics = curl(proxy.url + "/metrics").body.decode()
            return next(
                float(line.split()[1])
                for line in metrics.splitlines()
                if line.startswith("regproxy_in_flight_requests ")
            )

        eventually(lambda: in_flight() == 1, timeout=5)  # only the /metrics request itself
    finally:
        client.close()
