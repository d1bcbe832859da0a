"""The cache keeps its promises under faults, through real clients and a real registry:
a full cache volume never fails a pull the upstream serves, and an object corrupted on disk
while the proxy was stopped is never handed out whole.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.curl import curl
from tests.support.images import skopeo_copy
from tests.support.registry import RegistryServer
from tests.support.seed import SeededRegistry, StandardImages, seed_registry
from tests.support.tools import require_tools
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


@pytest.fixture
def small_volume(tmp: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test (root only), always unmounted afterwards."""
    mountpoint = tmp / "volume"
    mountpoint.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        require_tools(["root with mount(8), for a small tmpfs"], "a full cache volume")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        require_tools([f"mount -t tmpfs ({mounted.stderr.strip()})"], "a full cache volume")
    try:
        yield mountpoint
    finally:
        # Lazily if something still holds a file there: it is detached now either way.
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system holding ``directory`` with another file, to the last block."""
    filler = directory / "other-files"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as file:
        with contextlib.suppress(OSError):
            while True:
                file.write(chunk)
        with contextlib.suppress(OSError):
            while True:
                file.write(b"\0")
    with pytest.raises(OSError) as full:
        (directory / "probe").write_bytes(b"x")
    assert full.value.errno == errno.ENOSPC
    return filler


def metric(proxy, name: str) -> float:
    text = curl(proxy.url + "/metrics").body.decode()
    found = re.search(rf'regproxy_cache_events_total{{name="{name}"}} ([0-9.e+]+)', text)
    return float(found.group(1)) if found else 0.0


def stored_objects(cache: Path) -> list[Path]:
    return [p for p in (cache / "blobs").rglob("*") if p.is_file() and len(p.name) == 64]


def test_pulls_through_a_full_cache_volume_succeed(
    start_proxy, upstream: SeededRegistry, small_volume: Path, tmp: Path
) -> None:
    cache = small_volume / "cache"
    proxy = start_proxy(
        ["--upstream", upstream.url, "--cache-dir", str(cache), "--cache-max-size", "100M"]
    )
    try:
        filler = fill(small_volume)
        by_tag = skopeo_copy(f"{proxy.host_port}/app:v1", tmp / "tag", tag="v1")
        assert by_tag.digest == upstream["app:v1"]
        digest = upstream["app:v1"]
        by_digest = skopeo_copy(f"{proxy.host_port}/app@{digest}", tmp / "digest", tag="v1")
        assert by_digest.digest == digest
        # Its 8 MiB layer is four times the whole volume.
        big = skopeo_copy(f"{proxy.host_port}/big:v1", tmp / "big", tag="v1")
        assert big.digest == upstream["big:v1"]
        assert metric(proxy, "store_write_errors") > 0
        assert stored_objects(cache) == []
        # Space comes back: the cache stores again by itself.
        filler.unlink()
        again = skopeo_copy(f"{proxy.host_port}/app:v1", tmp / "again", tag="v1")
        assert again.digest == upstream["app:v1"]
        assert stored_objects(cache) != []
    finally:
        proxy.stop()
    warnings = [m for m in proxy.log_messages() if "cannot be written" in m]
    assert warnings and len(warnings) == len(set(warnings))  # once per streak, not per request


def test_a_tag_through_a_full_cache_volume_is_answered(
    start_proxy, upstream: SeededRegistry, small_volume: Path
) -> None:
    """The index write that failed (``record_tag``) was a 500; now it costs nothing."""
    cache = small_volume / "cache"
    proxy = start_proxy(
        ["--upstream", upstream.url, "--cache-dir", str(cache), "--cache-max-size", "100M"]
    )
    try:
        fill(small_volume)
        accept = "Accept: application/vnd.oci.image.manifest.v1+json"
        for _ in range(3):
            head = curl(proxy.url + "/v2/app/manifests/v1", "-I", "-H", accept)
            assert head.status == 200
            assert head.header("Docker-Content-Digest") == upstream["app:v1"]
        assert metric(proxy, "store_write_errors") >= 3
    finally:
        proxy.stop()
    warnings = [m for m in proxy.log_messages() if "cannot be written" in m]
    assert len(warnings) == 1


def corrupt_in_place(path: Path) -> None:
    """Flip one byte in the middle, keeping size and modification time."""
    stat = path.stat()
    with open(path, "r+b") as file:
        file.seek(stat.st_size // 2)
        byte = file.read(1)
        file.seek(stat.st_size // 2)
        file.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_blob_corrupted_while_stopped_is_never_served_whole(
    start_proxy, upstream: SeededRegistry, standard_images: StandardImages, tmp: Path
) -> None:
    layer = standard_images.big.layers[0]
    cache = tmp / "cache"
    args = ["--upstream", upstream.url, "--cache-dir", str(cache)]
    url_path = f"/v2/big/blobs/{layer.digest}"
    first = start_proxy(args)
    warm = tmp / "warm"
    subprocess.run(["curl", "-sSf", "-o", str(warm), first.url + url_path], check=True, timeout=60)
    assert "sha256:" + hashlib.sha256(warm.read_bytes()).hexdigest() == layer.digest
    first.stop()
    [stored] = [p for p in stored_objects(cache) if p.name == layer.digest.split(":")[1]]
    corrupt_in_place(stored)

    again = start_proxy(args)
    before = upstream_gets(upstream, "sha256")
    cut = tmp / "cut"
    result = subprocess.run(
        ["curl", "-sS", "-o", str(cut), again.url + url_path], timeout=60, check=False
    )
    # Cut off before the last byte: the client never completes the wrong bytes.
    assert result.returncode in (18, 52, 56), result.returncode
    assert cut.stat().st_size < layer.size
    eventually(lambda: not stored.exists())
    whole = tmp / "whole"
    subprocess.run(
        ["curl", "-sSf", "-o", str(whole), again.url + url_path], check=True, timeout=60
    )
    assert "sha256:" + hashlib.sha256(whole.read_bytes()).hexdigest() == layer.digest
    assert upstream_gets(upstream, "sha256") == before + 1  # fetched anew
    # And a whole image through skopeo, which checks every digest.
    pulled = skopeo_copy(f"{again.host_port}/big:v1", tmp / "pulled", tag="v1")
    assert pulled.digest == upstream["big:v1"]
    assert metric(again, "corrupt_objects") == 1
