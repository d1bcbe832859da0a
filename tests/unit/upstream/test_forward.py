"""The whole resource tree in memory: a treq client in front, a fake registry behind.

The proxy is wired as ``regproxy.service.build_service`` wires it, except that its upstream
client talks to :class:`FakeRegistry` through ``treq.testing.RequestTraversalAgent`` and the
client side is ``treq.testing.StubTreq``. Nothing touches the network or the global reactor.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from zope.interface import implementer

from regproxy.config import BlobRedirects, Credentials, Route, Upstream
from regproxy.protocol import challenge
from tests.support.inmemory import (
    AUTH_REALM,
    DIGEST,
    MANIFEST,
    OCI_MANIFEST,
    PROXY,
    Answer,
    FailingAgent,
    ProxyCase,
    Seen,
)
from tests.support.stalling import Stalling


class ForwardingTests(ProxyCase):
    def test_manifest_get_with_prefix(self) -> None:
        self.registry.on(
            f"/v2/proj/team/app/manifests/{DIGEST}",
            Answer(
                200,
                {
                    b"content-type": [OCI_MANIFEST.encode()],
                    b"docker-content-digest": [DIGEST.encode()],
                    b"docker-distribution-api-version": [b"registry/2.0"],
                    b"set-cookie": [b"session=upstream"],
                    b"x-custom": [b"kept"],
                },
                MANIFEST,
            ),
        )
        accepts = [
            b"application/vnd.oci.image.index.v1+json",
            b"application/vnd.docker.distribution.manifest.list.v2+json",
            OCI_MANIFEST.encode(),
        ]
        reply = self.get(
            f"/v2/team/app/manifests/{DIGEST}?ns=docker.io",
            headers={
                b"accept": accepts,
                b"user-agent": [b"containerd/1.7"],
                b"authorization": [b"Bearer client-token"],
                b"cookie": [b"proxy-session=1"],
                b"x-forwarded-for": [b"10.1.2.3"],
            },
        )
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, MANIFEST)
        self.assertEqual(reply.header(b"content-type"), [OCI_MANIFEST.encode()])
        self.assertEqual(reply.header(b"docker-content-digest"), [DIGEST.encode()])
        self.assertEqual(reply.length, len(MANIFEST))
        self.assertEqual(reply.header(b"x-custom"), [b"kept"])
        self.assertEqual(reply.header(b"set-cookie"), [])

        seen = self.only_seen()
        self.assertEqual(seen.method, b"GET")
        self.assertEqual(seen.host, b"upstream.example")
        self.assertEqual(seen.path, f"/v2/proj/team/app/manifests/{DIGEST}")
        self.assertEqual(seen.query, [("ns", "docker.io")])
        self.assertEqual(seen.headers.getRawHeaders(b"accept"), accepts)
        self.assertEqual(
            seen.headers.getRawHeaders(b"user-agent"),
            [b"regproxy/0.1 customDomain/proxy.example containerd/1.7"],
        )
        self.assertEqual(seen.headers.getRawHeaders(b"authorization"), [b"Bearer client-token"])
        for name in (b"cookie", b"x-forwarded-for", b"accept-encoding"):
            self.assertIsNone(seen.headers.getRawHeaders(name), name)

    def test_base_and_large_blob_stream_through(self) -> None:
        blob = bytes(range(256)) * 1024
        self.registry.on(
            "/v2/", Answer(200, {b"docker-distribution-api-version": [b"registry/2.0"]}, b"{}")
        )
        self.registry.on(
            f"/v2/proj/app/blobs/{DIGEST}",
            Answer(200, {b"content-type": [b"application/octet-stream"]}, blob),
        )
        base = self.get("/v2/")
        self.assertEqual((base.status, base.body), (200, b"{}"))
        reply = self.get(f"/v2/app/blobs/{DIGEST}", headers={b"range": [b"bytes=0-"]})
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, blob)
        self.assertEqual(reply.length, len(blob))
        self.assertEqual(
            [(s.path, s.headers.getRawHeaders(b"range")) for s in self.registry.seen],
            [("/v2/", None), (f"/v2/proj/app/blobs/{DIGEST}", [b"bytes=0-"])],
        )

    def test_ranged_read(self) -> None:
        self.registry.on(
            f"/v2/proj/app/blobs/{DIGEST}",
            Answer(206, {b"content-range": [b"bytes 2-4/10"]}, b"cde"),
        )
        reply = self.get(f"/v2/app/blobs/{DIGEST}", headers={b"range": [b"bytes=2-4"]})
        self.assertEqual((reply.status, reply.body), (206, b"cde"))
        self.assertEqual(reply.header(b"content-range"), [b"bytes 2-4/10"])

    def test_head_stays_head(self) -> None:
        self.registry.on(
            "/v2/proj/app/manifests/latest",
            Answer(
                200,
                {
                    b"docker-content-digest": [DIGEST.encode()],
                    b"content-type": [OCI_MANIFEST.encode()],
                },
                MANIFEST,
            ),
        )
        reply = self.request("HEAD", "/v2/app/manifests/latest")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, b"")
        # For HEAD, Content-Length is an entity header the client keeps among the headers.
        self.assertEqual(reply.header(b"content-length"), [b"%d" % len(MANIFEST)])
        self.assertEqual(reply.header(b"docker-content-digest"), [DIGEST.encode()])
        self.assertEqual(self.only_seen().method, b"HEAD")

    def test_relative_location_made_absolute(self) -> None:
        for status in (302, 307):
            for method in ("GET", "HEAD"):
                self.registry.seen.clear()
                self.registry.on(
                    f"/v2/proj/app/blobs/{DIGEST}",
                    Answer(status, {b"location": [b"/artifacts/blob?sig=a%2Fb"]}),
                )
                reply = self.request(method, f"/v2/app/blobs/{DIGEST}")
                self.assertEqual(reply.status, status)
                self.assertEqual(
                    reply.header(b"location"),
                    [b"https://upstream.example/artifacts/blob?sig=a%2Fb"],
                    (status, method),
                )
                seen = self.only_seen()
                self.assertEqual(seen.method, method.encode())

    def test_location_to_storage_host_unchanged(self) -> None:
        storage = b"https://storage.example/blob?X-Amz-Signature=abc"
        self.registry.on(f"/v2/proj/app/blobs/{DIGEST}", Answer(307, {b"location": [storage]}))
        reply = self.get(f"/v2/app/blobs/{DIGEST}")
        self.assertEqual((reply.status, reply.header(b"location")), (307, [storage]))
        # Passed to the client, never followed by the proxy.
        self.assertEqual(len(self.registry.seen), 1)

    def test_challenges_rewritten(self) -> None:
        self.registry.on(
            "/v2/proj/app/manifests/latest",
            Answer(
                401,
                {
                    b"www-authenticate": [
                        b'Bearer realm="https://auth.upstream.example/token",'
                        b'service="upstream.example",scope="repository:proj/app:pull"',
                        b'Basic realm="basic realm", Bearer realm="https://other/t",'
                        b'error="insufficient_scope"',
                    ],
                    b"docker-distribution-api-version": [b"registry/2.0"],
                    b"content-type": [b"application/json"],
                },
                b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required",'
                b'"detail":[{"Type":"repository","Name":"proj/app","Action":"pull"}]}]}',
            ),
        )
        reply = self.get("/v2/app/manifests/latest")
        self.assertEqual(reply.status, 401)
        self.assertEqual(reply.header(b"docker-distribution-api-version"), [b"registry/2.0"])
        values = [v.decode() for v in reply.header(b"www-authenticate")]
        self.assertEqual(
            challenge.parse_all(values),
            [
                challenge.Challenge(
                    "Bearer",
                    (
                        ("realm", PROXY + "/_token"),
                        ("service", "upstream.example"),
                        ("scope", "repository:app:pull"),
                    ),
                ),
                challenge.Challenge("Basic", (("realm", "basic realm"),)),
                challenge.Challenge(
                    "Bearer", (("realm", PROXY + "/_token"), ("error", "insufficient_scope"))
                ),
            ],
        )
        self.assertNotIn(b"proj", reply.body)
        self.assertEqual(reply.json()["errors"][0]["detail"][0]["Name"], "app")

    def test_realm_follows_forwarded_proto_and_host(self) -> None:
        self.registry.on(
            "/v2/",
            Answer(
                401, {b"www-authenticate": [b'Bearer realm="https://auth.upstream.example/t"']}
            ),
        )
        reply = self.get(
            "/v2/", headers={b"x-forwarded-proto": [b"https"], b"host": [b"r.example.com:8443"]}
        )
        self.assertEqual(
            reply.header(b"www-authenticate"),
            [b'Bearer realm="https://r.example.com:8443/_token"'],
        )

    def test_realm_from_public_url(self) -> None:
        self.make_proxy(self.upstream_agent, public_url="https://public.example")
        self.registry.on(
            "/v2/", Answer(401, {b"www-authenticate": [b'Bearer realm="https://a/t"']})
        )
        reply = self.get("/v2/", headers={b"host": [b"evil.example"]})
        self.assertEqual(
            reply.header(b"www-authenticate"), [b'Bearer realm="https://public.example/_token"']
        )

    def test_tags_list_paginated(self) -> None:
        self.registry.on(
            "/v2/proj/team/app/tags/list",
            Answer(
                200,
                {
                    b"content-type": [b"application/json"],
                    b"link": [b'</v2/proj/team/app/tags/list?last=b&n=2>; rel="next"'],
                },
                b'{"name":"proj/team/app","tags":["a","b"]}',
            ),
        )
        reply = self.get("/v2/team/app/tags/list?n=2&last=0")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json(), {"name": "team/app", "tags": ["a", "b"]})
        self.assertEqual(reply.length, len(reply.body))
        self.assertEqual(
            reply.header(b"link"), [b'</v2/team/app/tags/list?last=b&n=2>; rel="next"']
        )
        self.assertEqual(self.only_seen().query, [("n", "2"), ("last", "0")])

    def test_tags_list_bad_pagination(self) -> None:
        self.assert_oci_error(
            self.get("/v2/app/tags/list?n=lots"), 400, "PAGINATION_NUMBER_INVALID"
        )
        self.assert_oci_error(self.get("/v2/app/tags/list?last=.x"), 400, "TAG_INVALID")
        self.assertEqual(self.registry.seen, [])

    def test_catalog_first_page_runs_past_the_prefix(self) -> None:
        self.registry.on(
            "/v2/_catalog",
            Answer(
                200,
                {
                    b"content-type": [b"application/json"],
                    b"link": [b'</v2/_catalog?last=zeta&n=3>; rel="next"'],
                },
                b'{"repositories":["proj/a","proj/team/b","zeta"]}',
            ),
        )
        reply = self.get("/v2/_catalog?n=3")
        self.assertEqual(reply.json(), {"repositories": ["a", "team/b"]})
        self.assertEqual(reply.header(b"link"), [])
        self.assertEqual(reply.length, len(reply.body))
        self.assertEqual(self.only_seen().query, [("n", "3"), ("last", "proj/")])

    def test_catalog_next_page(self) -> None:
        self.registry.on(
            "/v2/_catalog",
            Answer(
                200,
                {
                    b"content-type": [b"application/json"],
                    b"link": [b'</v2/_catalog?last=proj%2Fteam%2Fc&n=2>; rel="next"'],
                },
                b'{"repositories":["proj/b","proj/team/c"]}',
            ),
        )
        reply = self.get("/v2/_catalog?last=a&n=2")
        self.assertEqual(reply.json(), {"repositories": ["b", "team/c"]})
        self.assertEqual(reply.header(b"link"), [b'</v2/_catalog?last=team%2Fc&n=2>; rel="next"'])
        self.assertEqual(self.only_seen().query, [("last", "proj/a"), ("n", "2")])

    def test_catalog_last_must_be_a_name(self) -> None:
        self.assert_oci_error(self.get("/v2/_catalog?last=..%2Fother"), 400, "NAME_INVALID")
        self.assertEqual(self.registry.seen, [])

    def test_error_body_without_prefix(self) -> None:
        self.registry.on(
            "/v2/proj/team/app/manifests/latest",
            Answer(
                404,
                {b"content-type": [b"application/json; charset=utf-8"]},
                b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown",'
                b'"detail":{"Name":"proj/team/app","Revision":"latest"}}]}',
            ),
        )
        reply = self.get("/v2/team/app/manifests/latest")
        self.assertEqual(reply.status, 404)
        self.assertEqual(
            reply.json(),
            {
                "errors": [
                    {
                        "code": "MANIFEST_UNKNOWN",
                        "message": "manifest unknown",
                        "detail": {"Name": "team/app", "Revision": "latest"},
                    }
                ]
            },
        )
        self.assertEqual(reply.length, len(reply.body))

    def test_read_only(self) -> None:
        for method in ("PUT", "DELETE", "POST", "PATCH"):
            for path in ("/v2/app/manifests/latest", f"/v2/app/blobs/{DIGEST}"):
                reply = self.request(method, path, data=b"x")
                self.assert_oci_error(reply, 405, "UNSUPPORTED")
                self.assertEqual(reply.header(b"allow"), [b"GET, HEAD"])
        for method in ("POST", "PUT", "PATCH", "GET"):
            reply = self.request(method, "/v2/app/blobs/uploads/")
            self.assert_oci_error(reply, 405, "UNSUPPORTED")
        self.assertEqual(self.registry.seen, [])

    def test_proxy_made_errors(self) -> None:
        cases = [
            ("/v2/App/manifests/latest", 400, "NAME_INVALID"),
            ("/v2/a%2F..%2Fb/manifests/latest", 400, "NAME_INVALID"),
            ("/v2/app/manifests/.x", 404, "MANIFEST_UNKNOWN"),
            ("/v2/app/blobs/sha256:abc", 400, "DIGEST_INVALID"),
            ("/v2/app/nothing/here", 404, "NOT_FOUND"),
        ]
        for path, status, code in cases:
            self.assert_oci_error(self.get(path), status, code)
            head = self.request("HEAD", path)
            self.assertEqual((head.status, head.body), (status, b""))
            self.assertEqual(head.header(b"docker-distribution-api-version"), [b"registry/2.0"])
        self.assertEqual(self.registry.seen, [])

    def test_upstream_connection_refused(self) -> None:
        self.make_proxy(FailingAgent(ConnectionRefusedError("nope")))
        error = self.assert_oci_error(
            self.get("/v2/app/manifests/latest"), 502, "UPSTREAM_UNAVAILABLE"
        )
        self.assertEqual(error["detail"], {"reason": "connect"})
        self.make_proxy(FailingAgent(DNSLookupError("no such host")))
        self.assert_oci_error(self.get("/v2/"), 502, "UPSTREAM_UNAVAILABLE")

    def test_upstream_timeout(self) -> None:
        @implementer(IAgent)
        class Silent:
            def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
                return Deferred()

        self.make_proxy(Silent())
        d = self.proxy.get(PROXY + "/v2/")
        self.assertNoResult(d)
        self.clock.advance(self.config.upstream_timeout - 0.5)
        self.proxy.flush()
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.proxy.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 504)
        body = json.loads(self.successResultOf(self.proxy.content(response)))
        self.assertEqual(body["errors"][0]["code"], "UPSTREAM_TIMEOUT")


class DockerHubTests(ProxyCase):
    route = Route(Upstream("https", "registry-1.docker.io"))

    def test_library_mapping(self) -> None:
        self.registry.on("/v2/library/ubuntu/manifests/22.04", Answer(200, {}, MANIFEST))
        self.registry.on("/v2/me/app/manifests/1", Answer(200, {}, MANIFEST))
        self.assertEqual(self.get("/v2/ubuntu/manifests/22.04").body, MANIFEST)
        self.assertEqual(self.get("/v2/me/app/manifests/1").body, MANIFEST)
        self.assertEqual(
            [s.path for s in self.registry.seen],
            ["/v2/library/ubuntu/manifests/22.04", "/v2/me/app/manifests/1"],
        )
        self.assertEqual(self.registry.seen[0].host, b"registry-1.docker.io")

    def test_library_name_not_leaked(self) -> None:
        self.registry.on(
            "/v2/library/ubuntu/tags/list",
            Answer(
                200,
                {b"content-type": [b"application/json"]},
                b'{"name":"library/ubuntu","tags":["x"]}',
            ),
        )
        self.registry.on(
            "/v2/library/ubuntu/manifests/nope",
            Answer(
                401,
                {
                    b"www-authenticate": [
                        b'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                        b'scope="repository:library/ubuntu:pull"'
                    ]
                },
            ),
        )
        self.assertEqual(
            self.get("/v2/ubuntu/tags/list").json(), {"name": "ubuntu", "tags": ["x"]}
        )
        [value] = self.get("/v2/ubuntu/manifests/nope").header(b"www-authenticate")
        [parsed] = challenge.parse(value.decode())
        self.assertEqual(parsed.get("scope"), "repository:ubuntu:pull")
        self.assertEqual(parsed.get("service"), "registry.docker.io")


class TokenTests(ProxyCase):
    token_body = (
        b'{"token":"t0k","access_token":"t0k","expires_in":300,"issued_at":"2024-01-01T00:00:00Z"}'
    )

    def setUp(self) -> None:
        super().setUp()
        self.registry.on(
            "/v2/",
            Answer(
                401,
                {
                    b"www-authenticate": [
                        b'Bearer realm="https://auth.upstream.example/token",service="upstream.example"'
                    ]
                },
            ),
        )
        self.registry.on(
            "/token", Answer(200, {b"content-type": [b"application/json"]}, self.token_body)
        )

    def token_requests(self) -> list[Seen]:
        return [seen for seen in self.registry.seen if seen.path == "/token"]

    def test_get_with_repeated_scopes(self) -> None:
        reply = self.get(
            "/_token?service=upstream.example&scope=repository:app:pull"
            "&scope=repository:team/b:pull,push%20repository:c:push&scope=registry:catalog:*",
            headers={b"authorization": [b"Basic dXNlcjpwdw=="], b"cookie": [b"c=1"]},
        )
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, self.token_body)
        # The realm comes from the upstream's own challenge, learnt from /v2/.
        self.assertEqual([s.path for s in self.registry.seen], ["/v2/", "/token"])
        [seen] = self.token_requests()
        self.assertEqual(seen.method, b"GET")
        self.assertEqual(seen.host, b"auth.upstream.example")
        self.assertEqual(
            seen.query,
            [
                ("service", "upstream.example"),
                ("scope", "repository:proj/app:pull"),
                ("scope", "repository:proj/team/b:pull"),
                ("scope", "registry:catalog:*"),
            ],
        )
        self.assertEqual(seen.headers.getRawHeaders(b"authorization"), [b"Basic dXNlcjpwdw=="])
        self.assertIsNone(seen.headers.getRawHeaders(b"cookie"))

    def test_post_form_with_space_separated_scopes(self) -> None:
        reply = self.request(
            "POST",
            "/_token",
            data={
                "grant_type": "password",
                "service": "upstream.example",
                "client_id": "docker",
                "scope": "repository:app:pull repository:team/b:pull,push repository:c:push",
                "username": "u",
                "password": "p",
            },
        )
        self.assertEqual((reply.status, reply.body), (200, self.token_body))
        [seen] = self.token_requests()
        self.assertEqual(seen.method, b"POST")
        self.assertEqual(seen.host, b"auth.upstream.example")
        self.assertEqual(
            seen.headers.getRawHeaders(b"content-type"), [b"application/x-www-form-urlencoded"]
        )
        self.assertEqual(
            parse_qsl(seen.body.decode()),
            [
                ("grant_type", "password"),
                ("service", "upstream.example"),
                ("client_id", "docker"),
                ("username", "u"),
                ("password", "p"),
                ("scope", "repository:proj/app:pull repository:proj/team/b:pull"),
            ],
        )

    def test_post_must_be_a_form(self) -> None:
        reply = self.request(
            "POST", "/_token", data=b"{}", headers={b"content-type": [b"application/json"]}
        )
        self.assertEqual(reply.status, 400)
        self.assertEqual(reply.json()["errors"][0]["code"], "REQUEST_INVALID")
        self.assertEqual(self.token_requests(), [])

    def test_without_scope(self) -> None:
        reply = self.get("/_token?service=upstream.example&account=me")
        self.assertEqual((reply.status, reply.body), (200, self.token_body))
        [seen] = self.token_requests()
        self.assertEqual(seen.query, [("service", "upstream.example"), ("account", "me")])
        reply = self.get("/_token")
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.token_requests()[-1].query, [])

    def test_realm_learnt_once(self) -> None:
        self.get("/_token?scope=repository:a:pull")
        self.get("/_token?scope=repository:b:pull")
        self.assertEqual([s.path for s in self.registry.seen], ["/v2/", "/token", "/token"])

    def test_invalid_scope_name(self) -> None:
        reply = self.get("/_token?scope=repository:../x:pull")
        self.assertEqual(reply.status, 400)
        self.assertEqual(reply.json()["errors"][0]["code"], "NAME_INVALID")
        self.assertEqual(self.token_requests(), [])

    def test_upstream_without_token_auth(self) -> None:
        self.registry.on("/v2/", Answer(200, {}, b"{}"))
        reply = self.get("/_token?scope=repository:a:pull")
        self.assertEqual(reply.status, 404)
        self.assertEqual(self.token_requests(), [])

    def test_token_errors_pass_through(self) -> None:
        self.registry.on(
            "/token",
            Answer(401, {b"content-type": [b"application/json"]}, b'{"details":"bad password"}'),
        )
        reply = self.get("/_token?scope=repository:a:pull")
        self.assertEqual((reply.status, reply.body), (401, b'{"details":"bad password"}'))

    def test_token_method_not_allowed(self) -> None:
        for method in ("PUT", "DELETE", "HEAD"):
            reply = self.request(method, "/_token", data=b"x" if method != "HEAD" else None)
            self.assertEqual(reply.status, 405)
        self.assertEqual(self.registry.seen, [])

    def test_token_allow_header_names_get_and_post(self) -> None:
        for method in ("PUT", "HEAD"):
            reply = self.request(method, "/_token", data=b"x" if method != "HEAD" else None)
            self.assertEqual((reply.status, reply.header(b"allow")), (405, [b"GET, POST"]))


class OtherPathTests(ProxyCase):
    def test_browser_redirect(self) -> None:
        reply = self.get("/team/app")
        self.assertEqual(reply.status, 307)
        self.assertEqual(reply.header(b"location"), [b"https://upstream.example/proj/team/app"])
        self.assertEqual(self.registry.seen, [])

    def test_browser_redirect_disabled(self) -> None:
        self.make_proxy(self.upstream_agent, disable_browser_redirects=True)
        self.assertEqual(self.get("/team/app").status, 404)

    def test_health(self) -> None:
        self.assertEqual(self.get("/healthz").body, b"ok\n")
        self.assertEqual(self.get("/readyz").body, b"ok\n")
        self.assertEqual(self.registry.seen, [])


class BrokenBodyTests(ProxyCase):
    def use(self, upstream: Resource) -> None:
        self.upstream_agent = RequestTraversalAgent(upstream)
        self.make_proxy(self.upstream_agent, idle_timeout=5.0)

    def start(self, path: str = f"/v2/app/blobs/{DIGEST}") -> Deferred[Any]:
        d = self.proxy.get(PROXY + path)
        for _ in range(5):
            self.upstream_agent.flush()
            self.proxy.flush()
        return d

    def test_upstream_hangs_up_mid_body(self) -> None:
        upstream = Stalling(hang_up=True)
        self.use(upstream)
        response = self.successResultOf(self.start())
        self.assertEqual((response.code, response.length), (200, 100))
        body = self.proxy.content(response)
        for _ in range(5):
            self.upstream_agent.flush()
            self.proxy.flush()
        # The client must never take the truncated body for a whole one.
        self.failureResultOf(body)

    def test_upstream_stalls_mid_body(self) -> None:
        upstream = Stalling(hang_up=False)
        self.use(upstream)
        response = self.successResultOf(self.start())
        self.assertEqual((response.code, response.length), (200, 100))
        body = self.proxy.content(response)
        # Data arrived in the first period, so the first check lets it go on.
        self.clock.pump([1.0] * 9)
        self.proxy.flush()
        self.assertNoResult(body)
        self.assertEqual(upstream.gone, [])
        self.clock.advance(1.0)
        for _ in range(5):
            self.upstream_agent.flush()
            self.proxy.flush()
        self.failureResultOf(body)
        # The upstream transfer was stopped, not left hanging.
        self.assertEqual(upstream.gone, [True])

    def test_upstream_stalls_in_a_body_that_is_rewritten(self) -> None:
        for status, path in ((404, "/v2/app/manifests/latest"), (200, "/v2/app/tags/list")):
            upstream = Stalling(hang_up=False, status=status)
            self.use(upstream)
            d = self.start(path)
            # Silent for less than the idle timeout (5 s): still waiting.
            self.clock.pump([1.0] * 4)
            self.assertNoResult(d)
            self.assertEqual(upstream.gone, [])
            self.clock.pump([1.0] * 2)
            for _ in range(5):
                self.upstream_agent.flush()
                self.proxy.flush()
            self.assertEqual(upstream.gone, [True])
            response = self.successResultOf(d)
            body = self.proxy.content(response)
            self.proxy.flush()
            [error] = json.loads(self.successResultOf(body))["errors"]
            self.assertEqual((response.code, error["code"]), (504, "UPSTREAM_TIMEOUT"), path)


class FollowRedirectTests(ProxyCase):
    route = Route(
        Upstream("https", "upstream.example"), prefix="proj", blob_redirects=BlobRedirects.FOLLOW
    )

    def test_follows_without_credentials(self) -> None:
        self.registry.on(
            f"/v2/proj/app/blobs/{DIGEST}",
            Answer(307, {b"location": [b"https://storage.example/blob?sig=1"]}),
        )
        self.registry.on(
            "/blob", Answer(200, {b"content-type": [b"application/octet-stream"]}, b"BLOB")
        )
        reply = self.get(
            f"/v2/app/blobs/{DIGEST}", headers={b"authorization": [b"Bearer client-token"]}
        )
        self.assertEqual((reply.status, reply.body, reply.length), (200, b"BLOB", 4))
        self.assertEqual(reply.header(b"location"), [])
        first, second = self.registry.seen
        self.assertEqual(first.headers.getRawHeaders(b"authorization"), [b"Bearer client-token"])
        self.assertEqual(
            (second.host, second.path, second.query), (b"storage.example", "/blob", [("sig", "1")])
        )
        self.assertIsNone(second.headers.getRawHeaders(b"authorization"))

    def test_manifest_redirects_are_passed(self) -> None:
        self.registry.on(
            "/v2/proj/app/manifests/latest", Answer(307, {b"location": [b"/elsewhere"]})
        )
        reply = self.get("/v2/app/manifests/latest")
        self.assertEqual(reply.status, 307)
        self.assertEqual(reply.header(b"location"), [b"https://upstream.example/elsewhere"])

    def test_redirect_loop(self) -> None:
        self.registry.on(f"/v2/proj/app/blobs/{DIGEST}", Answer(302, {b"location": [b"/again"]}))
        self.registry.on("/again", Answer(302, {b"location": [b"/again"]}))
        self.assert_oci_error(self.get(f"/v2/app/blobs/{DIGEST}"), 502, "UPSTREAM_UNAVAILABLE")


class DockerHubLinkTests(ProxyCase):
    route = Route(Upstream("https", "registry-1.docker.io"))

    def test_pagination_link_uses_the_clients_spelling(self) -> None:
        self.registry.on(
            "/v2/library/ubuntu/tags/list",
            Answer(
                200,
                {
                    b"content-type": [b"application/json"],
                    b"link": [b'</v2/library/ubuntu/tags/list?last=x&n=1>; rel="next"'],
                },
                b'{"name":"library/ubuntu","tags":["x"]}',
            ),
        )
        reply = self.get("/v2/ubuntu/tags/list?n=1")
        self.assertEqual(reply.header(b"link"), [b'</v2/ubuntu/tags/list?last=x&n=1>; rel="next"'])


class ProxyHeldCredentialsRefusedTests(ProxyCase):
    route = Route(
        Upstream("https", "upstream.example"),
        prefix="proj",
        credentials=Credentials(username="robot", password="s3cret"),
    )

    def test_a_refused_token_is_403_denied_without_a_challenge(self) -> None:
        """The client cannot satisfy a challenge for credentials the proxy holds."""
        challenge = f'Bearer realm="{AUTH_REALM}",service="upstream.example"'.encode()
        self.registry.on(
            "/v2/proj/app/manifests/v1", Answer(401, {b"www-authenticate": [challenge]})
        )
        self.registry.on(
            "/token", Answer(200, {b"content-type": [b"application/json"]}, b'{"token":"t"}')
        )
        reply = self.get("/v2/app/manifests/v1")
        self.assert_oci_error(reply, 403, "DENIED")
        self.assertEqual(reply.header(b"www-authenticate"), [])
        # The proxy did try: a token fetch, then the retry with it.
        paths = [seen.path for seen in self.registry.seen]
        self.assertEqual(
            paths, ["/v2/proj/app/manifests/v1", "/token", "/v2/proj/app/manifests/v1"]
        )
        self.assertEqual(
            self.registry.seen[-1].headers.getRawHeaders(b"authorization"), [b"Bearer t"]
        )

    def test_a_challenge_from_a_foreign_realm_reaches_the_client(self) -> None:
        """Credentials never go to a host they do not belong to; the client may answer."""
        challenge = b'Bearer realm="https://tokens.elsewhere.example/token",service="x"'
        self.registry.on(
            "/v2/proj/app/manifests/v1", Answer(401, {b"www-authenticate": [challenge]})
        )
        reply = self.get("/v2/app/manifests/v1")
        self.assertEqual(reply.status, 401)
        [value] = reply.header(b"www-authenticate")
        self.assertIn(b'realm="http://proxy.example/_token"', value)
        self.assertEqual([seen.host for seen in self.registry.seen], [b"upstream.example"])
        for seen in self.registry.seen:
            self.assertIsNone(seen.headers.getRawHeaders(b"authorization"))
