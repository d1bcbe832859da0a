"""Client requests mapped to upstream requests: validated first, nothing bad forwarded."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from regproxy.config import Route, Upstream
from regproxy.protocol.errors import OCIError
from regproxy.protocol.mapping import map_request
from regproxy.protocol.reference import MAX_NAME_LENGTH, Kind, RegistryPath, parse_v2_path
from tests.support.inmemory import Answer, ProxyCase

PREFIXED = Route(Upstream("https", "upstream.example"), prefix="my-project/mirror")


def mapped(path: str, route: Route = PREFIXED, method: bytes = b"GET", query: bytes = b""):  # type: ignore[no-untyped-def]
    return map_request(
        method=method,
        target=parse_v2_path(path),
        route=route,
        raw_query=query,
        client_headers=Headers({b"user-agent": [b"skopeo/1.0"]}),
        client_host=b"r.example",
    )


def test_prefixed_name_and_pull_scope() -> None:
    request = mapped("/v2/team/app/manifests/v1")
    assert request.url == "https://upstream.example/v2/my-project/mirror/team/app/manifests/v1"
    assert request.scope == "repository:my-project/mirror/team/app:pull"
    assert request.headers.getRawHeaders(b"user-agent") == [
        b"regproxy/0.1 customDomain/r.example skopeo/1.0"
    ]


def test_a_name_too_long_once_prefixed_is_name_invalid() -> None:
    """255 characters is a valid name, but not under a prefix: the upstream would 500."""
    name = "a" * MAX_NAME_LENGTH
    parse_v2_path(f"/v2/{name}/manifests/v1")  # valid on its own
    with pytest.raises(OCIError) as raised:
        mapped(f"/v2/{name}/manifests/v1")
    assert (raised.value.code, raised.value.status) == ("NAME_INVALID", 400)
    fitting = "a" * (MAX_NAME_LENGTH - len(PREFIXED.prefix) - 1)
    assert mapped(f"/v2/{fitting}/manifests/v1").upstream_name == f"{PREFIXED.prefix}/{fitting}"


@given(st.integers(min_value=1, max_value=MAX_NAME_LENGTH))
def test_upstream_names_never_exceed_the_limit(length: int) -> None:
    target = RegistryPath(Kind.TAGS, "a" * length)
    try:
        request = map_request(
            method=b"GET",
            target=target,
            route=PREFIXED,
            raw_query=b"",
            client_headers=Headers(),
            client_host=b"h",
        )
    except OCIError as error:
        assert error.code == "NAME_INVALID"
        assert length + len(PREFIXED.prefix) + 1 > MAX_NAME_LENGTH
    else:
        assert request.upstream_name is not None
        assert len(request.upstream_name) <= MAX_NAME_LENGTH


def test_head_of_a_rewritten_list_goes_up_as_get() -> None:
    assert mapped("/v2/app/tags/list", method=b"HEAD").method == "GET"
    assert mapped("/v2/app/manifests/v1", method=b"HEAD").method == "HEAD"
    unprefixed = Route(Upstream("https", "upstream.example"))
    assert mapped("/v2/team/app/tags/list", route=unprefixed, method=b"HEAD").method == "HEAD"


class QueryTests(ProxyCase):
    def test_unicode_digits_are_not_a_page_size(self) -> None:
        reply = self.get("/v2/app/tags/list?n=%C2%B2")
        self.assert_oci_error(reply, 400, "PAGINATION_NUMBER_INVALID")
        self.assertEqual(self.registry.seen, [])

    def test_an_empty_last_is_no_last(self) -> None:
        self.registry.on(
            "/v2/proj/app/tags/list",
            Answer(
                200, {b"content-type": [b"application/json"]}, b'{"name":"proj/app","tags":[]}'
            ),
        )
        self.assertEqual(self.get("/v2/app/tags/list?last=").status, 200)
        self.registry.on(
            "/v2/_catalog",
            Answer(200, {b"content-type": [b"application/json"]}, b'{"repositories":[]}'),
        )
        self.assertEqual(self.get("/v2/_catalog?last=&n=5").status, 200)
        self.assertEqual(self.registry.seen[-1].query, [("n", "5"), ("last", "proj/")])

    def test_writes_are_405_whatever_the_path(self) -> None:
        for method, path in (("DELETE", "/v2/app"), ("PUT", "/v2/app/manifests/Bad%20Tag")):
            reply = self.request(method, path)
            self.assert_oci_error(reply, 405, "UNSUPPORTED")
        self.assertEqual(self.registry.seen, [])

    def test_long_prefixed_name_is_refused_before_forwarding(self) -> None:
        reply = self.get("/v2/" + "a" * 252 + "/manifests/v1")  # 257 with "proj/"
        self.assert_oci_error(reply, 400, "NAME_INVALID")
        self.assertEqual(self.registry.seen, [])
