"""Many upstreams behind one proxy, in memory: each request reaches the route its ?ns=,
Host, path component or the default names, and everything the client sees is in its own
names; allow-lists make a repository look missing; tokens go to the route's own realm."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq

from regproxy.config import Config, Route, Upstream
from tests.support.inmemory import JSON_HEADERS, Answer, ProxyCase, build_tree

HUB = Route(Upstream.from_name("docker.io"), name="hub", path="hub")
GHCR = Route(Upstream.from_name("ghcr.io"), name="gh", host="ghcr.r.example")
MIRROR = Route(Upstream("https", "mirror.example"), name="mirror", namespace="docker.io")
PRIVATE = Route(
    Upstream("https", "private.example"), name="private", prefix="team", allow=("app", "lib/**")
)
MANIFEST = Answer(200, {b"content-type": [b"application/vnd.oci.image.manifest.v1+json"]}, b"{}")


class RoutingCase(ProxyCase):
    routes: tuple[Route, ...] = (HUB, GHCR, MIRROR, PRIVATE)

    def make_proxy(self, agent: Any, **config: Any) -> None:
        self.config = Config(routes=self.routes, **config)
        self.proxy = StubTreq(build_tree(self.config, agent, self.clock))

    def seen(self) -> list[tuple[bytes, str]]:
        return [(seen.host, seen.path) for seen in self.registry.seen]


class MatchingTests(RoutingCase):
    def test_a_path_route_strips_its_component(self) -> None:
        self.registry.on("/v2/library/alpine/manifests/latest", MANIFEST)
        self.assertEqual(self.get("/v2/hub/library/alpine/manifests/latest").status, 200)
        self.assertEqual(self.get("/v2/hub/alpine/manifests/latest").status, 200)
        host = b"registry-1.docker.io"
        path = "/v2/library/alpine/manifests/latest"
        self.assertEqual(self.seen(), [(host, path), (host, path)])

    def test_a_host_route_ignores_the_port(self) -> None:
        self.registry.on("/v2/owner/app/manifests/v1", MANIFEST)
        reply = self.get("/v2/owner/app/manifests/v1", headers={b"host": [b"GHCR.r.example:8443"]})
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.seen(), [(b"ghcr.io", "/v2/owner/app/manifests/v1")])

    def test_containerd_namespace_wins_over_everything(self) -> None:
        self.registry.on("/v2/library/alpine/manifests/latest", MANIFEST)
        reply = self.get(
            "/v2/library/alpine/manifests/latest?ns=docker.io",
            headers={b"host": [b"ghcr.r.example"]},
        )
        self.assertEqual(reply.status, 200)
        [(host, path)] = self.seen()
        self.assertEqual((host, path), (b"mirror.example", "/v2/library/alpine/manifests/latest"))
        self.assertEqual(self.registry.seen[0].query, [("ns", "docker.io")])

    def test_the_default_route_takes_the_rest_with_its_prefix(self) -> None:
        self.registry.on("/v2/team/app/manifests/v1", MANIFEST)
        self.assertEqual(self.get("/v2/app/manifests/v1").status, 200)
        self.assertEqual(self.seen(), [(b"private.example", "/v2/team/app/manifests/v1")])


class AllowListTests(RoutingCase):
    def test_a_denied_repository_looks_missing_on_every_endpoint(self) -> None:
        for method, path in (
            ("GET", "/v2/secret/manifests/v1"),
            ("HEAD", "/v2/secret/manifests/v1"),
            ("GET", "/v2/secret/tags/list"),
            ("GET", "/v2/secret/blobs/sha256:" + "0" * 64),
            ("GET", "/v2/lib/manifests/v1"),  # lib/** needs something below lib
        ):
            reply = self.request(method, path)
            self.assertEqual(reply.status, 404, path)
            if method == "GET":
                self.assertEqual(reply.json()["errors"][0]["code"], "NAME_UNKNOWN")
        self.assertEqual(self.registry.seen, [])

    def test_allowed_repositories_pass(self) -> None:
        self.registry.on("/v2/team/lib/x/y/manifests/v1", MANIFEST)
        self.assertEqual(self.get("/v2/lib/x/y/manifests/v1").status, 200)

    def test_token_scopes_outside_the_allow_list_are_dropped(self) -> None:
        self.registry.on(
            "/v2/",
            Answer(401, {b"www-authenticate": [b'Bearer realm="https://private.example/token"']}),
        )
        self.registry.on("/token", Answer(200, JSON_HEADERS, b'{"token":"t"}'))
        reply = self.get("/_token/private?scope=repository:secret:pull&scope=repository:app:pull")
        self.assertEqual(reply.status, 200)
        [token_request] = [seen for seen in self.registry.seen if seen.path == "/token"]
        self.assertEqual(token_request.query, [("scope", "repository:team/app:pull")])


class ClientNamesTests(RoutingCase):
    def test_tags_list_names_the_repository_with_the_route_component(self) -> None:
        self.registry.on(
            "/v2/library/alpine/tags/list",
            Answer(200, JSON_HEADERS, b'{"name":"library/alpine","tags":["3"]}'),
        )
        reply = self.get("/v2/hub/library/alpine/tags/list")
        self.assertEqual(json.loads(reply.body)["name"], "hub/library/alpine")

    def test_challenges_point_at_the_routes_realm_in_client_names(self) -> None:
        challenge = (
            b'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            b'scope="repository:library/alpine:pull"'
        )
        self.registry.on(
            "/v2/library/alpine/manifests/latest",
            Answer(401, {b"www-authenticate": [challenge]}),
        )
        [value] = self.get("/v2/hub/library/alpine/manifests/latest").header(b"www-authenticate")
        self.assertIn(b'realm="http://proxy.example/_token/hub/hub"', value)
        self.assertIn(b'scope="repository:hub/library/alpine:pull"', value)


class PingAndTokenTests(RoutingCase):
    def test_the_proxy_answers_the_ping_when_the_top_serves_several_upstreams(self) -> None:
        reply = self.get("/v2/")
        self.assertEqual(reply.status, 401)
        self.assertEqual(
            reply.header(b"www-authenticate"),
            [b'Bearer realm="http://proxy.example/_token",service="regproxy"'],
        )
        self.assertEqual(self.registry.seen, [])

    def test_a_host_routes_ping_goes_to_its_upstream(self) -> None:
        self.registry.on("/v2/", Answer(200, JSON_HEADERS, b"{}"))
        reply = self.get("/v2/", headers={b"host": [b"ghcr.r.example"]})
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.seen(), [(b"ghcr.io", "/v2/")])

    def test_the_top_realm_sends_a_path_routes_scopes_to_its_upstream_realm(self) -> None:
        challenge = b'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'
        self.registry.on("/v2/", Answer(401, {b"www-authenticate": [challenge]}))
        self.registry.on("/token", Answer(200, JSON_HEADERS, b'{"token":"t"}'))
        reply = self.get("/_token?scope=repository:hub/library/alpine:pull&service=regproxy")
        self.assertEqual(reply.status, 200)
        realm_ping, token = self.registry.seen
        self.assertEqual((realm_ping.host, realm_ping.path), (b"registry-1.docker.io", "/v2/"))
        self.assertEqual(token.host, b"auth.docker.io")
        self.assertEqual(
            token.query,
            [("service", "registry.docker.io"), ("scope", "repository:library/alpine:pull")],
        )

    def test_an_unknown_realm_is_404(self) -> None:
        self.assertEqual(self.get("/_token/nope?scope=repository:x:pull").status, 404)
        self.assertEqual(self.registry.seen, [])


class NoDefaultRouteTests(RoutingCase):
    routes = (HUB, GHCR)

    def test_a_name_no_route_serves_is_name_unknown(self) -> None:
        reply = self.get("/v2/somewhere/else/manifests/v1")
        self.assertEqual(reply.status, 404)
        self.assertEqual(reply.json()["errors"][0]["code"], "NAME_UNKNOWN")
        self.assertEqual(self.registry.seen, [])


class BrowserTests(RoutingCase):
    def test_a_browser_on_a_path_route_goes_to_that_upstreams_page(self) -> None:
        reply = self.get("/hub/alpine")
        self.assertEqual(reply.status, 307)
        self.assertEqual(reply.header(b"location"), [b"https://hub.docker.com/_/alpine"])

    def test_a_browser_on_a_denied_repository_gets_no_page(self) -> None:
        self.assertEqual(self.get("/secret").status, 404)
        reply = self.get("/app")
        self.assertEqual(reply.header(b"location"), [b"https://private.example/team/app"])


class CatalogTests(RoutingCase):
    def catalog(self, names: list[str], last: str) -> Answer:
        body = json.dumps({"repositories": names}).encode()
        link = f'</v2/_catalog?last={last}&n=2>; rel="next"'.encode()
        return Answer(200, {**JSON_HEADERS, b"link": [link]}, body)

    def test_hidden_repositories_are_neither_listed_nor_named_in_the_link(self) -> None:
        self.registry.on("/v2/_catalog", self.catalog(["team/app", "team/secret"], "team/secret"))
        reply = self.get("/v2/_catalog?n=2")
        self.assertEqual(reply.json()["repositories"], ["app"])
        [link] = reply.header(b"link")
        self.assertNotIn(b"secret", link)
        self.assertIn(b"last=app", link)

    def test_a_page_with_nothing_visible_ends_the_listing(self) -> None:
        self.registry.on("/v2/_catalog", self.catalog(["team/secret", "team/zz"], "team/zz"))
        reply = self.get("/v2/_catalog?n=2")
        self.assertEqual(reply.json()["repositories"], [])
        self.assertEqual(reply.header(b"link"), [])
