"""The cache in the request path, in memory: the whole resource tree with a cache
directory, a fake upstream that records what reached it, and a Clock."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from typing import Any

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from regproxy.cache.download import Downloads
from regproxy.cache.state import Cache
from regproxy.cache.store import open_store
from regproxy.config import Config, Credentials, Route, Upstream
from tests.support.inmemory import Answer, ProxyCase, build_tree

BLOB = b"layer bytes " * 1000
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"digest": BLOB_DIGEST, "size": len(BLOB)},
        "layers": [],
    }
).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
OCI = b"application/vnd.oci.image.manifest.v1+json"


def blob_answer(body: bytes = BLOB) -> Answer:
    return Answer(200, {b"content-type": [b"application/octet-stream"]}, body)


class CacheCase(ProxyCase):
    route = Route(Upstream("https", "upstream.example"))

    def make_proxy(self, agent: Any, **config: Any) -> None:
        self.config = Config(routes=(self.route,), **config)
        directory = tempfile.mkdtemp(prefix="regproxy-cache-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        store = open_store(directory, max_size=1 << 30, fsync=False, clock=self.clock.seconds)
        self.store = store
        self.fetcher = Cache(
            store, Downloads(store, clock=self.clock), clock=self.clock, stale_max_age=3600
        )
        self.proxy = StubTreq(build_tree(self.config, agent, self.clock, cache=self.fetcher))

    def seen(self) -> list[tuple[bytes, str]]:
        return [(s.method, s.path) for s in self.registry.seen]


class DigestTests(CacheCase):
    def test_a_second_get_is_served_without_the_upstream(self) -> None:
        self.registry.on(f"/v2/app/blobs/{BLOB_DIGEST}", blob_answer())
        first = self.get(f"/v2/app/blobs/{BLOB_DIGEST}")
        self.assertEqual((first.status, first.body), (200, BLOB))
        second = self.get(f"/v2/app/blobs/{BLOB_DIGEST}")
        self.assertEqual((second.status, second.body), (200, BLOB))
        self.assertEqual(second.header(b"docker-content-digest"), [BLOB_DIGEST.encode()])
        self.assertEqual(self.seen(), [(b"GET", f"/v2/app/blobs/{BLOB_DIGEST}")])

    def test_wrong_bytes_are_neither_kept_nor_delivered_whole(self) -> None:
        self.registry.on(f"/v2/app/blobs/{BLOB_DIGEST}", blob_answer(BLOB[:-1] + b"X"))
        d = self.proxy.get(f"http://proxy.example/v2/app/blobs/{BLOB_DIGEST}")
        for _ in range(10):
            self.upstream_agent.flush()
            self.proxy.flush()
        response = self.successResultOf(d)
        body = self.proxy.content(response)
        for _ in range(10):
            self.upstream_agent.flush()
            self.proxy.flush()
        self.failureResultOf(body)  # cut off: never a complete-looking wrong body
        self.assertFalse(self.store.contains(BLOB_DIGEST))

    def test_another_repository_does_not_read_a_blob_by_guessing_its_digest(self) -> None:
        self.registry.on(f"/v2/app/blobs/{BLOB_DIGEST}", blob_answer())
        self.get(f"/v2/app/blobs/{BLOB_DIGEST}")
        # The upstream says "other" does not hold it: the cache does not override that.
        self.registry.on(
            f"/v2/other/blobs/{BLOB_DIGEST}",
            Answer(404, {b"content-type": [b"application/json"]}, b'{"errors":[]}'),
        )
        reply = self.get(f"/v2/other/blobs/{BLOB_DIGEST}")
        self.assertEqual(reply.status, 404)
        self.assertIn((b"HEAD", f"/v2/other/blobs/{BLOB_DIGEST}"), self.seen())


class TagTests(CacheCase):
    def setUp(self) -> None:
        super().setUp()
        headers = {b"content-type": [OCI], b"docker-content-digest": [MANIFEST_DIGEST.encode()]}
        self.registry.on("/v2/app/manifests/v1", Answer(200, headers, MANIFEST))
        self.registry.on(f"/v2/app/manifests/{MANIFEST_DIGEST}", Answer(200, headers, MANIFEST))

    def test_a_tag_is_revalidated_with_a_head_and_served_from_disk(self) -> None:
        accept = {b"accept": [OCI]}
        self.assertEqual(self.get("/v2/app/manifests/v1", headers=accept).body, MANIFEST)
        again = self.get("/v2/app/manifests/v1", headers=accept)
        self.assertEqual((again.body, again.header(b"content-type")), (MANIFEST, [OCI]))
        methods = [m for m, path in self.seen() if "/manifests/" in path]
        self.assertEqual(methods, [b"HEAD", b"GET", b"HEAD"])

    def test_a_failing_upstream_gets_the_last_known_digest_with_a_warning(self) -> None:
        accept = {b"accept": [OCI]}
        self.get("/v2/app/manifests/v1", headers=accept)
        self.registry.on("/v2/app/manifests/v1", Answer(503))
        stale = self.get("/v2/app/manifests/v1", headers=accept)
        self.assertEqual((stale.status, stale.body), (200, MANIFEST))
        self.assertEqual(stale.header(b"warning"), [b'110 - "Response is Stale"'])
        self.clock.advance(3601)  # past --cache-stale-max-age
        self.assertEqual(self.get("/v2/app/manifests/v1", headers=accept).status, 503)


class ClientCredentialsTests(CacheCase):
    def test_a_hit_needs_the_upstreams_yes_for_this_client(self) -> None:
        self.registry.on(f"/v2/app/blobs/{BLOB_DIGEST}", blob_answer())
        self.get(f"/v2/app/blobs/{BLOB_DIGEST}", headers={b"authorization": [b"Bearer good"]})

        def by_token(request: Any) -> Answer:
            if request.getHeader(b"authorization") == b"Bearer good":
                return blob_answer()
            return Answer(401, {b"www-authenticate": [b'Bearer realm="https://a/token"']})

        self.registry.on(f"/v2/app/blobs/{BLOB_DIGEST}", by_token)
        refused = self.get(
            f"/v2/app/blobs/{BLOB_DIGEST}", headers={b"authorization": [b"Bearer other"]}
        )
        self.assertEqual(refused.status, 401)
        allowed = self.get(
            f"/v2/app/blobs/{BLOB_DIGEST}", headers={b"authorization": [b"Bearer good"]}
        )
        self.assertEqual((allowed.status, allowed.body), (200, BLOB))


class ProxyHeldCredentialsTests(CacheCase):
    route = Route(
        Upstream("https", "upstream.example"),
        credentials=Credentials(auth_header="Bearer proxy"),
    )

    def test_hits_need_no_upstream_check(self) -> None:
        self.registry.on(f"/v2/app/blobs/{BLOB_DIGEST}", blob_answer())
        self.get(f"/v2/app/blobs/{BLOB_DIGEST}")
        self.assertEqual(self.get(f"/v2/app/blobs/{BLOB_DIGEST}").body, BLOB)
        self.assertEqual(len(self.seen()), 1)


class HeldUpstream(Resource):
    """Answers only when the test releases it, as a slow upstream would."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []

    def render(self, request: Request) -> object:
        self.held.append(request)
        return NOT_DONE_YET

    def release(self, content_type: bytes, body: bytes) -> None:
        held, self.held = self.held, []
        for request in held:
            request.setHeader(b"content-type", content_type)
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()


class JoiningTests(CacheCase):
    def test_a_client_that_joins_before_the_upstream_answers_gets_its_headers(self) -> None:
        upstream = HeldUpstream()
        self.upstream_agent = RequestTraversalAgent(upstream)
        self.make_proxy(self.upstream_agent)
        url = f"http://proxy.example/v2/app/manifests/{MANIFEST_DIGEST}"
        first = self.proxy.get(url, headers={b"accept": [OCI]})
        second = self.proxy.get(url, headers={b"accept": [OCI]})
        for _ in range(5):
            self.upstream_agent.flush()
            self.proxy.flush()
        # One GET for both clients (the second asks with a HEAD whether it may read it).
        self.assertEqual([r.method for r in upstream.held].count(b"GET"), 1)
        upstream.release(OCI, MANIFEST)
        for _ in range(10):
            self.upstream_agent.flush()
            self.proxy.flush()
        for d in (first, second):
            response = self.successResultOf(d)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [OCI])
            body = self.proxy.content(response)
            for _ in range(5):
                self.proxy.flush()
            self.assertEqual(self.successResultOf(body), MANIFEST)
