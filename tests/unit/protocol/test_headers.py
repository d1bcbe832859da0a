"""Which headers cross the proxy, and the Location/Link rewriting."""

from __future__ import annotations

import pytest
from twisted.web.http_headers import Headers

from regproxy.config import Route, Upstream
from regproxy.protocol.headers import URLRewriter, response_headers, upstream_request_headers
from regproxy.upstream.treq_client import HIDDEN_CONTENT_ENCODING

UA = b"regproxy/0.1 customDomain/proxy.example"
ROUTE = Route(Upstream("https", "upstream.example"), prefix="proj")
DIGEST = "sha256:" + "ab" * 32


def _lower(pairs: list[tuple[bytes, list[bytes]]]) -> dict[bytes, list[bytes]]:
    return {name.lower(): values for name, values in pairs}


def test_upstream_request_headers_whitelist() -> None:
    client = Headers()
    client.setRawHeaders(
        b"accept",
        [
            b"application/vnd.oci.image.index.v1+json",
            b"application/vnd.docker.distribution.manifest.list.v2+json",
            b"application/vnd.oci.image.manifest.v1+json, */*",
        ],
    )
    client.setRawHeaders(b"range", [b"bytes=0-99"])
    client.setRawHeaders(b"if-range", [b'"etag"'])
    client.setRawHeaders(b"if-none-match", [b'"etag"'])
    client.setRawHeaders(b"user-agent", [b"containerd/1.7"])
    for name in (
        b"cookie",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"host",
        b"authorization",
        b"proxy-authorization",
        b"connection",
        b"accept-encoding",
        b"x-custom",
    ):
        client.setRawHeaders(name, [b"client-" + name])
    out = upstream_request_headers(client, UA)
    assert dict(out.getAllRawHeaders()) == {
        b"Accept": [
            b"application/vnd.oci.image.index.v1+json",
            b"application/vnd.docker.distribution.manifest.list.v2+json",
            b"application/vnd.oci.image.manifest.v1+json, */*",
        ],
        b"Range": [b"bytes=0-99"],
        b"If-Range": [b'"etag"'],
        b"If-None-Match": [b'"etag"'],
        b"User-Agent": [UA + b" containerd/1.7"],
    }


def test_upstream_request_headers_without_client_user_agent() -> None:
    out = upstream_request_headers(Headers(), UA)
    assert list(out.getAllRawHeaders()) == [(b"User-Agent", [UA])]


def test_response_headers_drops_hop_by_hop_and_cookies() -> None:
    upstream = Headers()
    kept = {
        b"content-type": [b"application/vnd.oci.image.manifest.v1+json"],
        b"docker-content-digest": [DIGEST.encode()],
        b"docker-distribution-api-version": [b"registry/2.0"],
        b"www-authenticate": [b'Bearer realm="a"', b'Basic realm="b"'],
        b"warning": [b'299 - "deprecated"'],
        b"retry-after": [b"30"],
        b"content-range": [b"bytes 0-9/100"],
        b"etag": [b'"x"'],
    }
    for name, values in kept.items():
        upstream.setRawHeaders(name, values)
    for name in (
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"set-cookie",
        b"set-cookie2",
        b"server",
        b"date",
        b"x-hop",
        b"x-other-hop",
    ):
        upstream.setRawHeaders(name, [b"v"])
    upstream.setRawHeaders(b"connection", [b"keep-alive, X-Hop", b"x-other-hop"])
    assert _lower(response_headers(upstream)) == kept


def test_response_headers_restores_hidden_content_encoding() -> None:
    upstream = Headers()
    # What treq's decoder leaves behind, and the real value the client agent hid from it.
    upstream.setRawHeaders(b"content-encoding", [b""])
    upstream.setRawHeaders(HIDDEN_CONTENT_ENCODING, [b"gzip"])
    upstream.setRawHeaders(b"content-type", [b"application/octet-stream"])
    assert _lower(response_headers(upstream)) == {
        b"content-encoding": [b"gzip"],
        b"content-type": [b"application/octet-stream"],
    }


def test_response_headers_drops_a_visible_content_encoding() -> None:
    upstream = Headers()
    upstream.setRawHeaders(b"content-encoding", [b"gzip"])
    assert response_headers(upstream) == []


def _rewriter(request_path: str = f"/v2/proj/app/blobs/{DIGEST}") -> URLRewriter:
    return URLRewriter(
        "https://upstream.example",
        "https://upstream.example" + request_path,
        "http://proxy.example",
        ROUTE.client_name,
    )


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        # Relative: absolute to the upstream, so the bytes come from there.
        ("/storage/blob?sig=a%2Fb", "https://upstream.example/storage/blob?sig=a%2Fb"),
        ("//storage.example/b", "https://storage.example/b"),
        # The upstream's own /v2/ name of the repository: back through the proxy, unprefixed.
        (f"/v2/proj/app/blobs/{DIGEST}", f"http://proxy.example/v2/app/blobs/{DIGEST}"),
        (
            f"https://upstream.example/v2/proj/team/app/manifests/{DIGEST}",
            f"http://proxy.example/v2/team/app/manifests/{DIGEST}",
        ),
        ("https://upstream.example/v2/", "http://proxy.example/v2/"),
        # Foreign hosts are left alone.
        ("https://storage.example/b?sig=1", "https://storage.example/b?sig=1"),
        # Upstream paths outside the prefix or the API stay absolute to the upstream.
        (
            f"https://upstream.example/v2/other/app/blobs/{DIGEST}",
            f"https://upstream.example/v2/other/app/blobs/{DIGEST}",
        ),
        ("/artifacts-downloads/x", "https://upstream.example/artifacts-downloads/x"),
        ("/v2/proj/app/other", "https://upstream.example/v2/proj/app/other"),
    ],
)
def test_location(location: str, expected: str) -> None:
    assert _rewriter().location(location) == expected


def test_link_tags_next_page() -> None:
    rewriter = _rewriter("/v2/proj/team/app/tags/list?n=2")
    assert (
        rewriter.link('</v2/proj/team/app/tags/list?n=2&last=v2>; rel="next"')
        == '</v2/team/app/tags/list?n=2&last=v2>; rel="next"'
    )
    # An absolute upstream link comes back relative too.
    assert (
        rewriter.link(
            '<https://upstream.example/v2/proj/team/app/tags/list?n=2&last=v2>; rel="next"'
        )
        == '</v2/team/app/tags/list?n=2&last=v2>; rel="next"'
    )


def test_link_catalog_last_is_mapped() -> None:
    rewriter = _rewriter("/v2/_catalog?n=2&last=proj%2F")
    assert (
        rewriter.link('</v2/_catalog?last=proj%2Fteam%2Fapp&n=2>; rel="next"')
        == '</v2/_catalog?last=team%2Fapp&n=2>; rel="next"'
    )
    assert (
        rewriter.link('</v2/_catalog?last=proj/foo&n=2>; rel="next"')
        == '</v2/_catalog?last=foo&n=2>; rel="next"'
    )


def test_link_to_foreign_host_unchanged() -> None:
    value = '<https://elsewhere.example/v2/proj/a/tags/list>; rel="next"'
    assert _rewriter().link(value) == value
