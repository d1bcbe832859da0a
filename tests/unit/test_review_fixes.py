"""Defects a review found, each pinned by the test that shows it fixed."""

from __future__ import annotations

import json
from typing import Any

from regproxy.bodies import WITHHELD, prefix_scrubber
from regproxy.headers import URLRewriter
from tests.unit.test_forward import AUTH_REALM, MANIFEST, OCI_MANIFEST, Answer, ProxyCase

BEARER = {
    b"www-authenticate": [f'Bearer realm="{AUTH_REALM}",service="upstream.example"'.encode()]
}
TOKEN = Answer(200, {b"content-type": [b"application/json"]}, b'{"token":"t"}')


class RealmRelearntTests(ProxyCase):
    def test_a_v2_answer_without_challenge_is_not_remembered(self) -> None:
        answers = iter([Answer(503), Answer(401, BEARER)])
        self.registry.on("/v2/", lambda request: next(answers))
        self.registry.on("/token", TOKEN)
        first = self.get("/_token?scope=repository:app:pull")
        self.assertEqual((first.status, first.json()["errors"][0]["code"]), (404, "NOT_FOUND"))
        second = self.get("/_token?scope=repository:app:pull")
        self.assertEqual(second.status, 200)
        self.assertEqual(json.loads(second.body), {"token": "t"})

    def test_an_http_realm_of_an_https_upstream_is_refused(self) -> None:
        challenge = b'Bearer realm="http://auth.upstream.example/token",service="s"'
        self.registry.on("/v2/", Answer(401, {b"www-authenticate": [challenge]}))
        reply = self.get("/_token?scope=repository:app:pull")
        self.assertEqual((reply.status, reply.json()["errors"][0]["code"]), (404, "NOT_FOUND"))
        self.assertEqual([seen.path for seen in self.registry.seen], ["/v2/"])

    def test_token_answers_keep_their_content_length(self) -> None:
        self.registry.on("/v2/", Answer(401, BEARER))
        self.registry.on("/token", TOKEN)
        reply = self.get("/_token?scope=repository:app:pull")
        self.assertEqual(reply.length, len(b'{"token":"t"}'))


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
        self.registry.on(
            "/v2/proj/app/manifests/v1",
            Answer(403, {b"content-type": [b"application/json"]}, json.dumps(body).encode()),
        )
        reply = self.get("/v2/app/manifests/v1")
        self.assertEqual(reply.status, 403)
        [error] = json.loads(reply.body)["errors"]
        self.assertEqual(error["detail"], {"name": "app"})
        self.assertEqual(
            error["message"],
            f"Permission denied on resource project {WITHHELD} (or it may not exist)",
        )

    def test_head_of_a_rewritten_list_has_no_stale_length(self) -> None:
        self.registry.on(
            "/v2/proj/app/tags/list",
            Answer(200, {b"content-length": [b"35"]}, b'{"name":"proj/app","tags":["v1"]}'),
        )
        reply = self.request("HEAD", "/v2/app/tags/list")
        self.assertEqual(reply.status, 200)
        self.assertNotEqual(reply.length, 35)

    def test_writes_are_405_whatever_the_path(self) -> None:
        for method, path in (("DELETE", "/v2/app"), ("PUT", "/v2/app/manifests/Bad%20Tag")):
            reply = self.request(method, path)
            self.assert_oci_error(reply, 405, "UNSUPPORTED")
        self.assertEqual(self.registry.seen, [])

    def test_unicode_digits_are_not_a_page_size(self) -> None:
        reply = self.get("/v2/app/tags/list?n=%C2%B2")
        self.assert_oci_error(reply, 400, "PAGINATION_NUMBER_INVALID")
        self.assertEqual(self.registry.seen, [])

    def test_manifest_still_streams(self) -> None:
        self.registry.on(
            "/v2/proj/app/manifests/v1",
            Answer(200, {b"content-type": [OCI_MANIFEST.encode()]}, MANIFEST),
        )
        reply = self.get("/v2/app/manifests/v1")
        self.assertEqual((reply.status, reply.body, reply.length), (200, MANIFEST, len(MANIFEST)))


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


class EmptyLastTests(ProxyCase):
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


class ChallengeDescriptionTests(ProxyCase):
    def test_error_description_does_not_name_the_prefix(self) -> None:
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
