"""What reaches the client of an upstream answer: the prefix withheld, lists rewritten only
when they name the upstream, no stale lengths, no headers of the upstream's own origin."""

from __future__ import annotations

import json
from typing import Any

from regproxy.config import Route, Upstream
from regproxy.protocol.bodies import WITHHELD, prefix_scrubber
from regproxy.protocol.headers import URLRewriter
from tests.support.inmemory import AUTH_REALM, MANIFEST, OCI_MANIFEST, Answer, ProxyCase

JSON = {b"content-type": [b"application/json"]}


class PrefixWithheldTests(ProxyCase):
    def test_prefix_components_in_error_text_are_withheld(self) -> None:
        body = {
            "errors": [
                {
                    "code": "DENIED",
                    "message": "Permission denied on resource project proj (or it may not exist)",
                    "detail": {"name": "proj/app"},
                }
            ]
        }
        self.registry.on("/v2/proj/app/manifests/v1", Answer(403, JSON, json.dumps(body).encode()))
        reply = self.get("/v2/app/manifests/v1")
        self.assertEqual(reply.status, 403)
        [error] = json.loads(reply.body)["errors"]
        self.assertEqual(error["detail"], {"name": "app"})
        self.assertEqual(
            error["message"],
            f"Permission denied on resource project {WITHHELD} (or it may not exist)",
        )

    def test_error_description_in_challenges_does_not_name_the_prefix(self) -> None:
        challenge = (
            f'Bearer realm="{AUTH_REALM}",scope="repository:proj/app:pull",'
            'error="insufficient_scope",error_description="no access to proj/app in proj"'
        ).encode()
        self.registry.on(
            "/v2/proj/app/manifests/v1", Answer(401, {b"www-authenticate": [challenge]})
        )
        [value] = self.get("/v2/app/manifests/v1").header(b"www-authenticate")
        self.assertIn(f'error_description="no access to app in {WITHHELD}"'.encode(), value)
        self.assertIn(b'scope="repository:app:pull"', value)

    def test_manifest_bytes_stream_untouched(self) -> None:
        self.registry.on(
            "/v2/proj/app/manifests/v1",
            Answer(200, {b"content-type": [OCI_MANIFEST.encode()]}, MANIFEST),
        )
        reply = self.get("/v2/app/manifests/v1")
        self.assertEqual((reply.status, reply.body, reply.length), (200, MANIFEST, len(MANIFEST)))


class HeadLengthTests(ProxyCase):
    """A HEAD's Content-Length is the length of the body the GET gets."""

    def test_head_of_a_rewritten_tags_list_has_the_get_length(self) -> None:
        upstream_body = b'{"name":"proj/app","tags":["v1"]}'
        self.registry.on("/v2/proj/app/tags/list", Answer(200, JSON, upstream_body))
        get = self.get("/v2/app/tags/list")
        head = self.request("HEAD", "/v2/app/tags/list")
        self.assertEqual((head.status, head.body), (200, b""))
        self.assertNotEqual(len(get.body), len(upstream_body))
        self.assertEqual(head.header(b"content-length"), [b"%d" % len(get.body)])

    def test_head_of_a_rewritten_error_carries_no_stale_length(self) -> None:
        body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown",'
        body += b'"detail":{"Name":"proj/app","Revision":"v9"}}]}\n'
        self.registry.on("/v2/proj/app/manifests/v9", Answer(404, JSON, body))
        get = self.get("/v2/app/manifests/v9")
        head = self.request("HEAD", "/v2/app/manifests/v9")
        self.assertEqual(head.status, 404)
        self.assertNotEqual(len(get.body), len(body))
        lengths = head.header(b"content-length")
        # The upstream's HEAD has no body to rewrite: no length rather than a wrong one.
        self.assertIn(lengths, ([], [b"%d" % len(get.body)]))


class UnprefixedRoute(ProxyCase):
    route = Route(Upstream("https", "upstream.example"))


class ListsStreamWhenNothingIsRewrittenTests(UnprefixedRoute):
    def test_tags_list_bytes_pass_as_sent(self) -> None:
        # Odd spacing a rewrite would normalise: the bytes must arrive exactly as sent.
        body = b'{ "name" : "team/app",  "tags" : [ "v1" ] }\n'
        self.registry.on("/v2/team/app/tags/list", Answer(200, JSON, body))
        reply = self.get("/v2/team/app/tags/list")
        self.assertEqual((reply.status, reply.body, reply.length), (200, body, len(body)))
        head = self.request("HEAD", "/v2/team/app/tags/list")
        self.assertEqual(self.registry.seen[-1].method, b"HEAD")
        self.assertEqual(head.header(b"content-length"), [b"%d" % len(body)])


class OriginHeadersTests(ProxyCase):
    def test_headers_of_the_upstreams_own_origin_are_not_relayed(self) -> None:
        self.registry.on(
            "/v2/proj/app/manifests/v1",
            Answer(
                200,
                {
                    b"content-type": [OCI_MANIFEST.encode()],
                    b"alt-svc": [b'h3=":443"; ma=2592000'],
                    b"strict-transport-security": [b"max-age=31536000; includeSubDomains"],
                    b"set-cookie": [b"session=upstream"],
                    b"warning": [b'110 - "Response is Stale"'],
                },
                MANIFEST,
            ),
        )
        reply = self.get("/v2/app/manifests/v1")
        for name in (b"alt-svc", b"strict-transport-security", b"set-cookie"):
            self.assertEqual(reply.header(name), [], name)
        self.assertEqual(reply.header(b"warning"), [b'110 - "Response is Stale"'])


def test_scrubber_keeps_the_clients_own_name() -> None:
    scrub = prefix_scrubber("proj", ("proj/proj-tools", "proj-tools"))
    assert scrub is not None
    text = scrub("proj/proj-tools not found in project proj")
    assert text == f"proj-tools not found in project {WITHHELD}"


def test_scrubber_is_none_without_anything_to_hide() -> None:
    assert prefix_scrubber("", None) is None
    assert prefix_scrubber("", ("app", "app")) is None


def test_location_with_an_explicit_default_port_is_recognised() -> None:
    def client_name(name: str) -> Any:
        return name.removeprefix("proj/")

    rewriter = URLRewriter(
        "https://upstream.example", "https://upstream.example/v2/", "https://r.test", client_name
    )
    location = rewriter.location("https://upstream.example:443/v2/proj/app/blobs/sha256:0")
    assert location == "https://r.test/v2/app/blobs/sha256:0"
