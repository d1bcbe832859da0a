"""Test data for the benchmarks: random blobs written to files, pushed with monolithic PUTs.

The 1 GiB blob is written in 1 MiB chunks of ``os.urandom`` (hashed on the way) and uploaded
with one streamed ``PUT ...?digest=`` (distribution's monolithic upload), never held in memory.
The small multi-layer image is built with the test fixtures and pushed with skopeo.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from tests.support.images import (
    OCI_CONFIG,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    ImageInfo,
    RegistryClient,
    build_image,
    push,
    sha256_digest,
)

CHUNK = 1 << 20


@dataclass(frozen=True)
class BlobFile:
    path: Path
    digest: str
    size: int


@dataclass(frozen=True)
class BlobImage:
    """A one-layer image whose layer is a random blob (``name`` is the upstream name)."""

    name: str
    tag: str
    blob: BlobFile
    manifest_digest: str


def random_file(path: Path, size: int) -> BlobFile:
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = os.urandom(min(CHUNK, left))
            digest.update(chunk)
            handle.write(chunk)
            left -= len(chunk)
    return BlobFile(path, "sha256:" + digest.hexdigest(), size)


def connection(
    url: str, cafile: Path | str | None = None, timeout: float = 300.0
) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        return http.client.HTTPSConnection(
            parts.hostname, parts.port, context=context, timeout=timeout, blocksize=CHUNK
        )
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout, blocksize=CHUNK)


def upload_blob(
    registry_url: str, name: str, source: BlobFile | bytes, cafile: Path | str | None = None
) -> str:
    """POST an upload session, then PUT the whole blob in one streamed request."""
    if isinstance(source, bytes):
        digest, size = sha256_digest(source), len(source)
    else:
        digest, size = source.digest, source.size
    conn = connection(registry_url, cafile)
    try:
        conn.request("POST", f"/v2/{name}/blobs/uploads/", headers={"Content-Length": "0"})
        response = conn.getresponse()
        response.read()
        if response.status != 202:
            raise RuntimeError(f"starting an upload to {name}: HTTP {response.status}")
        location = urlsplit(urljoin(registry_url + "/", response.getheader("Location", "")))
        query = f"{location.query}&digest={digest}" if location.query else f"digest={digest}"
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        if isinstance(source, bytes):
            conn.request("PUT", f"{location.path}?{query}", body=source, headers=headers)
        else:
            with open(source.path, "rb") as body:
                conn.request("PUT", f"{location.path}?{query}", body=body, headers=headers)
        response = conn.getresponse()
        text = response.read()
        if response.status != 201:
            raise RuntimeError(f"uploading {digest} to {name}: HTTP {response.status} {text!r}")
    finally:
        conn.close()
    return digest


def push_blob_image(
    registry_url: str, name: str, tag: str, blob: BlobFile, cafile: Path | str | None = None
) -> BlobImage:
    """Upload *blob* as the only layer of an OCI image ``name:tag``."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [blob.digest]},
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    upload_blob(registry_url, name, config, cafile)
    upload_blob(registry_url, name, blob, cafile)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": sha256_digest(config),
                "size": len(config),
            },
            "layers": [{"mediaType": OCI_LAYER_TAR, "digest": blob.digest, "size": blob.size}],
        },
        indent=3,
    ).encode()
    response = RegistryClient(registry_url, cafile=cafile).put_manifest(
        name, tag, manifest, OCI_MANIFEST
    )
    if response.status != 201:
        raise RuntimeError(f"PUT manifest {name}:{tag}: HTTP {response.status}")
    return BlobImage(name, tag, blob, sha256_digest(manifest))


def push_small_image(registry_url: str, layout: Path, name: str, tag: str) -> ImageInfo:
    """The small multi-layer image (3 gzip layers: 2 KiB, 64 KiB, 256 KiB of random data)."""
    image = build_image(layout, [2048, 64 * 1024, 256 * 1024], tag=tag)
    host_port = urlsplit(registry_url).netloc
    push(layout, tag, f"{host_port}/{name}:{tag}")
    return image
