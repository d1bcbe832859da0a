"""Build the standard test images once and push them into any registry fixture."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .images import ImageInfo, IndexInfo, build_image, build_multiarch, push, push_tags
from .registry import RegistryServer

MANY_TAG_COUNT = 300
BIG_LAYER = 8 * 1024 * 1024


@dataclass(frozen=True)
class StandardImages:
    """OCI layouts built once per session (random data), pushed to every seeded registry."""

    layout: Path
    app: ImageInfo  # 3 small layers, tag "app"
    multi: IndexInfo  # amd64 + arm64 index, tag "multi"
    big: ImageInfo  # one ~8 MiB layer, tag "big"
    many: ImageInfo  # tiny, uncompressed layer, tag "many"

    @property
    def many_tags(self) -> list[str]:
        return [f"t{i:03d}" for i in range(MANY_TAG_COUNT)]


def build_standard_images(directory: Path | str) -> StandardImages:
    layout = Path(directory)
    return StandardImages(
        layout=layout,
        app=build_image(layout, [2048, 64 * 1024, 200 * 1024], tag="app"),
        multi=build_multiarch(layout, ("amd64", "arm64"), [1024, 8192], tag="multi"),
        big=build_image(layout, [BIG_LAYER], tag="big"),
        many=build_image(layout, [512], tag="many", compress=False),
    )


@dataclass
class SeededRegistry:
    """A registry holding the standard images; ``seeded["app:v1"]`` is a digest.

    Repositories: ``app:v1``, ``team/app:v1`` (same image as app), ``multi:v1`` (index),
    ``big:v1``, ``many`` with tags ``t000``..``t299``.
    """

    registry: RegistryServer
    images: StandardImages
    digests: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> str:
        return self.digests[key]

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def host_port(self) -> str:
        return self.registry.host_port

    @property
    def many_tags(self) -> list[str]:
        return self.images.many_tags


def seed_registry(
    registry: RegistryServer,
    images: StandardImages,
    creds: tuple[str, str] | None = None,
    prefix: str = "",
) -> SeededRegistry:
    """Push the standard images into *registry* (with *creds* when it needs them).

    With *prefix*, every repository lives under ``prefix/`` (``proj/app``, ...), as an
    upstream that regproxy serves with ``--repo-prefix``.
    """
    under = f"{prefix}/" if prefix else ""
    creds = creds if creds is not None else registry.credentials
    cert_dir = registry.tls.cert_dir if registry.tls else None
    cafile = registry.tls.ca_cert if registry.tls else None
    host = registry.host_port

    def put(tag: str, ref: str) -> None:
        push(images.layout, tag, f"{host}/{under}{ref}", creds=creds, cert_dir=cert_dir)

    put("app", "app:v1")
    put("app", "team/app:v1")
    put("multi", "multi:v1")
    put("big", "big:v1")
    put("many", f"many:{images.many_tags[0]}")
    push_tags(
        registry.url,
        f"{under}many",
        images.many_tags[0],
        images.many_tags[1:],
        creds=creds,
        cafile=cafile,
    )
    digests = {
        "app:v1": images.app.digest,
        "team/app:v1": images.app.digest,
        "multi:v1": images.multi.digest,
        "multi:v1@amd64": images.multi.manifest_digests["amd64"],
        "multi:v1@arm64": images.multi.manifest_digests["arm64"],
        "big:v1": images.big.digest,
        "big:v1@layer": images.big.layers[0].digest,
        "many": images.many.digest,
    }
    return SeededRegistry(registry=registry, images=images, digests=digests)
