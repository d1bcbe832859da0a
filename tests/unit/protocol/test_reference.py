"""The distribution grammar and ``/v2/`` path parsing: nothing malformed goes upstream."""

from __future__ import annotations

import pytest

from regproxy.protocol.errors import OCIError
from regproxy.protocol.reference import (
    Kind,
    RegistryPath,
    parse_v2_path,
    validate_digest,
    validate_manifest_reference,
    validate_name,
    validate_tag,
)

SHA256 = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "0123456789abcdef" * 8


def _error(call, *args) -> OCIError:
    with pytest.raises(OCIError) as caught:
        call(*args)
    return caught.value


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "team/app",
        "a.b_c__d--e/x",
        "a0/b1/c2/d3",
        "library/ubuntu",
        "a" * 255,
    ],
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "A",
        "Team/app",
        "a//b",
        "/a",
        "a/",
        "..",
        ".",
        "a/../b",
        "a/./b",
        "a%2Fb",
        "a___b",
        "-a",
        "a-",
        "a_",
        "a.-b",
        "a b",
        "",
        "a:5000/b",
        "a" * 256,
        "a/" * 127 + "bb",  # 256 characters, every component valid
    ],
)
def test_invalid_names(name: str) -> None:
    error = _error(validate_name, name)
    assert (error.code, error.status) == ("NAME_INVALID", 400)


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "_x", "A-b_c.d", "a" * 128, "0"])
def test_valid_tags(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", [".hidden", "-x", "a" * 129, "", "a/b", "a:b", "a b", "é"])
def test_invalid_tags(tag: str) -> None:
    error = _error(validate_tag, tag)
    assert (error.code, error.status) == ("TAG_INVALID", 400)


@pytest.mark.parametrize("digest", [SHA256, SHA512])
def test_valid_digests(digest: str) -> None:
    assert validate_digest(digest) == digest


@pytest.mark.parametrize(
    "digest",
    [
        SHA256.upper(),
        "sha256:" + "0123456789ABCDEF" * 4,
        SHA256[:-1],
        SHA256 + "0",
        "sha256:" + "g" * 64,
        "sha512:" + "0" * 64,
        "md5:" + "0" * 32,
        "sha256" + "0" * 64,
        "sha256:",
        ":" + "0" * 64,
        "",
    ],
)
def test_invalid_digests(digest: str) -> None:
    error = _error(validate_digest, digest)
    assert (error.code, error.status) == ("DIGEST_INVALID", 400)


def test_manifest_reference_is_a_digest_when_it_has_a_colon() -> None:
    assert validate_manifest_reference("latest") == "latest"
    assert validate_manifest_reference(SHA256) == SHA256
    # Neither a tag nor a digest: a manifest that cannot exist (the OCI conformance suite).
    for reference in ("md5:" + "0" * 32, ".latest", ".INVALID_MANIFEST_NAME", "sha256:abc"):
        error = _error(validate_manifest_reference, reference)
        assert (error.code, error.status) == ("MANIFEST_UNKNOWN", 404)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2", RegistryPath(Kind.BASE)),
        ("/v2/", RegistryPath(Kind.BASE)),
        ("/v2/_catalog", RegistryPath(Kind.CATALOG)),
        ("/v2/team/app/tags/list", RegistryPath(Kind.TAGS, "team/app")),
        ("/v2/a/manifests/latest", RegistryPath(Kind.MANIFEST, "a", "latest")),
        ("/v2/team/app/manifests/" + SHA256, RegistryPath(Kind.MANIFEST, "team/app", SHA256)),
        ("/v2/a/blobs/" + SHA256, RegistryPath(Kind.BLOB, "a", SHA256)),
        ("/v2/a/b/c/blobs/" + SHA512, RegistryPath(Kind.BLOB, "a/b/c", SHA512)),
        ("/v2/a/referrers/" + SHA256, RegistryPath(Kind.REFERRERS, "a", SHA256)),
        # A percent-encoded colon in a digest is the same digest.
        (
            "/v2/a/manifests/" + SHA256.replace(":", "%3A"),
            RegistryPath(Kind.MANIFEST, "a", SHA256),
        ),
        # Endpoint words are legal name components; the last ones decide the endpoint.
        (
            "/v2/a/manifests/b/manifests/latest",
            RegistryPath(Kind.MANIFEST, "a/manifests/b", "latest"),
        ),
        ("/v2/blobs/tags/list/tags/list", RegistryPath(Kind.TAGS, "blobs/tags/list")),
        ("/v2/tags/manifests/list", RegistryPath(Kind.MANIFEST, "tags", "list")),
    ],
)
def test_parse_v2_path(path: str, expected: RegistryPath) -> None:
    assert parse_v2_path(path) == expected


@pytest.mark.parametrize(
    ("target", "canonical"),
    [
        (RegistryPath(Kind.BASE), "/v2/"),
        (RegistryPath(Kind.CATALOG), "/v2/_catalog"),
        (RegistryPath(Kind.TAGS, "a"), "/v2/p/a/tags/list"),
        (RegistryPath(Kind.MANIFEST, "a", "latest"), "/v2/p/a/manifests/latest"),
        (RegistryPath(Kind.BLOB, "a", SHA256), f"/v2/p/a/blobs/{SHA256}"),
        (RegistryPath(Kind.REFERRERS, "a", SHA256), f"/v2/p/a/referrers/{SHA256}"),
    ],
)
def test_canonical_path_for_the_upstream_name(target: RegistryPath, canonical: str) -> None:
    assert target.path("p/a") == canonical
    assert parse_v2_path(target.path()) == target


@pytest.mark.parametrize(
    "path",
    [
        "/v2/a/blobs/uploads/",
        "/v2/a/blobs/uploads",
        "/v2/team/app/blobs/uploads/3f1c0e6a-uuid",
        "/v2/a/b/c/blobs/uploads/",
    ],
)
def test_uploads_are_unsupported(path: str) -> None:
    error = _error(parse_v2_path, path)
    assert (error.code, error.status) == ("UNSUPPORTED", 405)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/team/uploads/blobs/" + SHA256, RegistryPath(Kind.BLOB, "team/uploads", SHA256)),
        (
            "/v2/blobs/uploads/manifests/latest",
            RegistryPath(Kind.MANIFEST, "blobs/uploads", "latest"),
        ),
    ],
)
def test_repository_named_uploads_is_not_an_upload(path: str, expected: RegistryPath) -> None:
    assert parse_v2_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/v2/a%2Fb/manifests/latest",
        "/v2/team%2fapp/tags/list",
        "/v2/a%2Fb/blobs/" + SHA256,
        "/v2/a/manifests/x%2Flatest",
        "/v2/a/blobs/sha256%2F" + "0" * 64,
        "/v2/a/b%2Fmanifests/latest",
    ],
)
def test_encoded_slash_never_becomes_a_separator(path: str) -> None:
    # Decoded after splitting, a "/" would still reach the upstream as a separator.
    error = _error(parse_v2_path, path)
    assert (error.code, error.status) == ("NAME_INVALID", 400)


@pytest.mark.parametrize(
    "path",
    [
        "/v2/a/../b/manifests/latest",
        "/v2/./a/manifests/latest",
        "/v2/a/%2E%2E/b/manifests/latest",
        "/v2/../v2/a/tags/list",
        "/v2/a//b/tags/list",
        "/v2//a/tags/list",
        "/v2/A/manifests/latest",
        "/v2/a%ff/manifests/latest",
        "/v2/" + "a" * 256 + "/manifests/latest",
    ],
)
def test_bad_names_in_paths(path: str) -> None:
    error = _error(parse_v2_path, path)
    assert (error.code, error.status) == ("NAME_INVALID", 400)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/a/manifests/..", "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/.latest", "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/" + "t" * 129, "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/md5:" + "0" * 32, "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/" + SHA256.upper(), "MANIFEST_UNKNOWN"),
        ("/v2/a/blobs/latest", "DIGEST_INVALID"),
        ("/v2/a/blobs/" + SHA256[:-2], "DIGEST_INVALID"),
        ("/v2/a/referrers/latest", "DIGEST_INVALID"),
    ],
)
def test_bad_references_in_paths(path: str, code: str) -> None:
    error = _error(parse_v2_path, path)
    expected_status = 404 if code == "MANIFEST_UNKNOWN" else 400
    assert (error.code, error.status) == (code, expected_status)


@pytest.mark.parametrize(
    "path",
    [
        "/v2/a",
        "/v2/a/b",
        "/v2/a/foo/bar",
        "/v2/tags/list",
        "/v2/manifests/latest",
        "/v2/a/manifests/latest/",
        "/v2/a/tags/list/",
        "/v2/_catalog/x",
        "/v2/a/_catalog",
        "/v2/a/blobs",
        "/v2/a/tags",
    ],
)
def test_unknown_endpoints_are_404(path: str) -> None:
    error = _error(parse_v2_path, path)
    assert (error.code, error.status) == ("NOT_FOUND", 404)


def test_error_detail_is_truncated() -> None:
    error = _error(validate_name, "A" * 1000)
    assert error.detail == {"limit": 255}
    error = _error(validate_tag, "." * 1000)
    assert len(error.detail["tag"]) == 300
