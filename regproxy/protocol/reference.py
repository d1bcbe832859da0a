"""The distribution grammar for names, tags and digests, and parsing of ``/v2/`` paths.

Everything a client puts in a path is checked here before anything goes upstream: some
registries answer a malformed reference with a 5xx (distribution 2.8 does for digests),
and a proxy on the internet should give scanners a clear 4xx instead.
"""

from __future__ import annotations

import enum
import re
from urllib.parse import unquote

import attrs

from .errors import OCIError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
# Registries in the wild implement these two; anything else cannot name real content.
DIGEST_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_LOWER_HEX = re.compile(r"[a-f0-9]+")
# distribution limits the full name (with host) to 255 characters.
MAX_NAME_LENGTH = 255


class Kind(enum.Enum):
    BASE = "base"
    CATALOG = "catalog"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"


@attrs.frozen
class RegistryPath:
    """A validated ``/v2/`` request target: what is asked for, never how it was spelt."""

    kind: Kind
    name: str = ""
    reference: str = ""

    def path(self, name: str | None = None) -> str:
        """The canonical path, optionally for another repository name (the upstream's)."""
        name = self.name if name is None else name
        if self.kind is Kind.BASE:
            return "/v2/"
        if self.kind is Kind.CATALOG:
            return "/v2/_catalog"
        if self.kind is Kind.TAGS:
            return f"/v2/{name}/tags/list"
        segment = {Kind.MANIFEST: "manifests", Kind.BLOB: "blobs", Kind.REFERRERS: "referrers"}
        return f"/v2/{name}/{segment[self.kind]}/{self.reference}"


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH:
        raise OCIError("NAME_INVALID", "repository name is too long", {"limit": MAX_NAME_LENGTH})
    if not NAME_RE.fullmatch(name):
        raise OCIError("NAME_INVALID", "invalid repository name", {"name": name[:300]})
    return name


def validate_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise OCIError("TAG_INVALID", "invalid tag", {"tag": tag[:300]})
    return tag


def validate_digest(digest: str) -> str:
    match = DIGEST_RE.fullmatch(digest)
    if match is None:
        raise OCIError("DIGEST_INVALID", "invalid digest", {"digest": digest[:300]})
    algorithm, encoded = match.groups()
    length = DIGEST_HEX_LENGTH.get(algorithm)
    if length is None:
        raise OCIError(
            "DIGEST_INVALID", "unsupported digest algorithm", {"algorithm": algorithm[:50]}
        )
    if len(encoded) != length or not _LOWER_HEX.fullmatch(encoded):
        raise OCIError("DIGEST_INVALID", "invalid digest", {"digest": digest[:300]})
    return digest


def validate_manifest_reference(reference: str) -> str:
    """A tag or a digest; anything else names a manifest that cannot exist.

    That is a 404 ``MANIFEST_UNKNOWN``, not a 400: the distribution registry answers so,
    and the OCI conformance suite asks for it (``/manifests/.INVALID_MANIFEST_NAME``).
    """
    if TAG_RE.fullmatch(reference):
        return reference
    try:
        return validate_digest(reference)
    except OCIError:
        raise OCIError(
            "MANIFEST_UNKNOWN", "manifest unknown", {"reference": reference[:300]}
        ) from None


def _segments(path: str) -> list[str]:
    """Split on ``/`` first, then decode, so ``%2F`` can never become a separator."""
    segments = [unquote(segment, errors="strict") for segment in path.split("/")]
    if any("/" in segment for segment in segments):
        raise OCIError("NAME_INVALID", "encoded slashes are not allowed in paths")
    return segments


def parse_v2_path(path: str) -> RegistryPath:
    """Parse the raw (still percent-encoded) path of a request under ``/v2``.

    Raises OCIError: 400 for a malformed name or reference, 405 for uploads (the proxy is
    read-only), 404 for anything that is not a registry endpoint.
    """
    if path in ("/v2", "/v2/"):
        return RegistryPath(Kind.BASE)
    try:
        segments = _segments(path)
    except UnicodeDecodeError:
        raise OCIError("NAME_INVALID", "invalid repository name") from None
    # segments[0] is "" (the leading slash) and segments[1] is "v2".
    rest = segments[2:]
    if rest == ["_catalog"]:
        return RegistryPath(Kind.CATALOG)
    if rest[-2:] == ["blobs", "uploads"] or rest[-3:-1] == ["blobs", "uploads"]:
        raise OCIError("UNSUPPORTED", "this registry is read-only: uploads are not accepted")
    if len(rest) >= 3 and rest[-2:] == ["tags", "list"]:
        return RegistryPath(Kind.TAGS, validate_name("/".join(rest[:-2])))
    if len(rest) >= 3:
        segment, reference = rest[-2], rest[-1]
        name = "/".join(rest[:-2])
        if segment == "manifests":
            validate_name(name)
            return RegistryPath(Kind.MANIFEST, name, validate_manifest_reference(reference))
        if segment == "blobs":
            validate_name(name)
            return RegistryPath(Kind.BLOB, name, validate_digest(reference))
        if segment == "referrers":
            validate_name(name)
            return RegistryPath(Kind.REFERRERS, name, validate_digest(reference))
    raise OCIError("NOT_FOUND", "no such registry endpoint")
