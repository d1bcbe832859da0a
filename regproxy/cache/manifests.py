"""What the cache reads in a manifest: its media type, and the digests it names."""

from __future__ import annotations

import json

from .objects import is_cacheable

MANIFEST_LIMIT = 4 * 1024 * 1024
"""The largest manifest the cache parses (distribution's own limit)."""


def manifest_media_type(data: bytes) -> bytes:
    """The Content-Type of manifest bytes: their ``mediaType``, else by shape.

    Only for manifests stored before their upstream Content-Type was recorded: the
    upstream's own header is what the cache serves when it has it.
    """
    try:
        document = json.loads(data)
    except ValueError:
        return b"application/json"
    if not isinstance(document, dict):
        return b"application/json"
    media_type = document.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type.encode()
    if document.get("schemaVersion") == 1:
        return b"application/vnd.docker.distribution.manifest.v1+prettyjws"
    if "manifests" in document:
        return b"application/vnd.oci.image.index.v1+json"
    return b"application/vnd.oci.image.manifest.v1+json"


def referenced_digests(data: bytes) -> list[str]:
    """What a manifest or index names: its config, layers, child manifests, subject."""
    try:
        document = json.loads(data)
    except ValueError:
        return []
    if not isinstance(document, dict):
        return []
    found: list[str] = []
    for key in ("config", "subject"):
        item = document.get(key)
        if isinstance(item, dict) and isinstance(item.get("digest"), str):
            found.append(item["digest"])
    for key in ("layers", "manifests", "blobs"):
        for item in document.get(key) or ():
            if isinstance(item, dict) and isinstance(item.get("digest"), str):
                found.append(item["digest"])
    for item in document.get("fsLayers") or ():  # schema 1
        if isinstance(item, dict) and isinstance(item.get("blobSum"), str):
            found.append(item["blobSum"])
    return [digest for digest in found if is_cacheable(digest)]
