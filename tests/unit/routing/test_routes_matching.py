"""Which route answers a request, and names and scopes as each route's clients see them."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regproxy.config import Route, Upstream, compile_globs
from regproxy.protocol.errors import OCIError
from regproxy.routing.matching import (
    MatchedBy,
    Mount,
    RouteTable,
    allowed,
    request_host,
    route_scopes,
)

HUB = Route(
    Upstream.from_name("docker.io"),
    name="hub",
    path="hub",
    namespace="docker.io",
    allow=("library/*", "myorg/**"),
)
GHCR = Route(Upstream.from_name("ghcr.io"), name="ghcr", path="ghcr", namespace="ghcr.io")
QUAY = Route(Upstream.from_name("quay.io"), name="quay", host="quay.r.example.com")
WILD = Route(Upstream.from_name("gcr.io"), name="wild", host="*.r.example.com", prefix="proj")
OWN = Route(Upstream.from_url("http://127.0.0.1:5000"), name="own", prefix="mirror")
TABLE = RouteTable((HUB, GHCR, QUAY, WILD, OWN))


def matched(
    host: str | None, namespace: str | None, name: str | None
) -> tuple[str, str, MatchedBy, str | None] | None:
    match = TABLE.match(host, namespace, name)
    if match is None:
        return None
    return (match.route.name, match.name, match.by, match.mount.path)


@pytest.mark.parametrize(
    ("host", "namespace", "name", "expected"),
    [
        # ?ns= comes first, whatever the Host and the first component.
        (
            "quay.r.example.com",
            "docker.io",
            "ghcr/x",
            ("hub", "ghcr/x", MatchedBy.NAMESPACE, None),
        ),
        (None, "GHCR.IO", "a/b", ("ghcr", "a/b", MatchedBy.NAMESPACE, None)),
        # An ns no route claims falls through, as containerd sends it for every mirror.
        (None, "registry.k8s.io", "hub/alpine", ("hub", "alpine", MatchedBy.PATH, "hub")),
        # Then the Host, port ignored, case-insensitive; exact before wildcard.
        ("Quay.R.Example.com:8443", None, "hub/x", ("quay", "hub/x", MatchedBy.HOST, None)),
        ("quay.r.example.com.", None, "a", ("quay", "a", MatchedBy.HOST, None)),
        ("gcr.r.example.com", None, "app", ("wild", "app", MatchedBy.HOST, None)),
        ("a.b.r.example.com:80", None, "app", ("wild", "app", MatchedBy.HOST, None)),
        # The bare domain is not below the wildcard.
        ("r.example.com", None, "app", ("own", "app", MatchedBy.DEFAULT, None)),
        # Then the first component of the repository name.
        (
            "r.example.com",
            None,
            "hub/library/alpine",
            ("hub", "library/alpine", MatchedBy.PATH, "hub"),
        ),
        ("r.example.com", None, "ghcr/org/app", ("ghcr", "org/app", MatchedBy.PATH, "ghcr")),
        ("r.example.com", None, "hubx/app", ("own", "hubx/app", MatchedBy.DEFAULT, None)),
        # Then the default route.
        (None, None, "library/alpine", ("own", "library/alpine", MatchedBy.DEFAULT, None)),
        ("[::1]:8080", None, "x", ("own", "x", MatchedBy.DEFAULT, None)),
        # Requests that name no repository: /v2/ and _catalog.
        (None, None, None, ("own", "", MatchedBy.DEFAULT, None)),
        ("quay.r.example.com", None, None, ("quay", "", MatchedBy.HOST, None)),
        (None, "docker.io", None, ("hub", "", MatchedBy.NAMESPACE, None)),
        # A path route shadows the default route's repository of the same first component.
        (None, None, "hub", None),
    ],
)
def test_matching_order(
    host: str | None,
    namespace: str | None,
    name: str | None,
    expected: tuple[str, str, MatchedBy, str | None] | None,
) -> None:
    assert matched(host, namespace, name) == expected


def test_no_default_route_means_no_match() -> None:
    table = RouteTable((HUB, QUAY))
    assert table.match("r.example.com", None, "library/alpine") is None
    assert table.match(None, "quay.io", None) is None


def test_by_name() -> None:
    assert TABLE.by_name("ghcr") is GHCR
    assert TABLE.by_name("nope") is None


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("Example.COM", "example.com"),
        ("example.com:8080", "example.com"),
        ("example.com.", "example.com"),
        ("127.0.0.1:5000", "127.0.0.1"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
        (" localhost ", "localhost"),
    ],
)
def test_request_host_drops_the_port(header: str, host: str) -> None:
    assert request_host(header) == host


def test_localhost_and_127_are_two_hosts() -> None:
    a = Route(Upstream("http", "127.0.0.1:1"), name="a", host="localhost")
    b = Route(Upstream("http", "127.0.0.1:2"), name="b", host="127.0.0.1")
    table = RouteTable((a, b))
    matches = [table.match(host, None, "x") for host in ("localhost:80", "127.0.0.1:80")]
    assert [match.route if match else None for match in matches] == [a, b]


def test_the_one_route_of_the_flags_answers_everything() -> None:
    route = Route(Upstream("https", "registry-1.docker.io"))
    table = RouteTable((route,))
    for args in [("a.example", "docker.io", "alpine"), (None, None, None), ("x", None, "a/b")]:
        match = table.match(*args)
        assert match is not None and match.route is route and match.by is MatchedBy.DEFAULT
    assert table.token_mount("default", ["repository:alpine:pull"]) == Mount(route)
    assert route_scopes(route, ["repository:alpine:pull"]) == ["repository:library/alpine:pull"]


# Names as clients of a mount see them.


def test_a_path_route_maps_names_with_its_component() -> None:
    match = TABLE.match(None, None, "hub/alpine")
    assert match is not None
    assert (match.name, match.upstream_name) == ("alpine", "library/alpine")
    mount = match.mount
    assert mount.client_name("library/alpine") == "hub/library/alpine"
    assert mount.upstream_name("hub/alpine") == "library/alpine"
    assert mount.upstream_name("ghcr/alpine") is None
    assert mount.route_name("hub") is None


def test_an_unmounted_route_maps_names_without_component() -> None:
    mount = Mount(HUB)
    assert mount.client_name("library/alpine") == "library/alpine"
    assert mount.upstream_name("library/alpine") == "library/alpine"
    assert mount.upstream_name("alpine") == "library/alpine"


def test_prefix_and_path_together() -> None:
    route = Route(Upstream("https", "gcr.io"), name="g", path="g", prefix="proj/sub")
    mount = Mount(route, "g")
    assert mount.upstream_name("g/app") == "proj/sub/app"
    assert mount.client_name("proj/sub/app") == "g/app"
    assert mount.client_name("other/app") is None


def test_catalog_names_carry_the_component_and_respect_allow() -> None:
    mount = Mount(HUB, "hub")
    upstream = ["library/alpine", "myorg/a/b", "someone/else"]
    assert [mount.catalog_name(name) for name in upstream] == [
        "hub/library/alpine",
        "hub/myorg/a/b",
        None,
    ]
    assert Mount(OWN).catalog_name("mirror/app") == "app"
    assert Mount(OWN).catalog_name("elsewhere/app") is None


def test_token_paths_say_whether_the_client_is_mounted() -> None:
    assert Mount(HUB).token_path == "/_token/hub"
    assert Mount(HUB, "hub").token_path == "/_token/hub/hub"
    assert TABLE.token_mount("hub") == Mount(HUB)
    assert TABLE.token_mount("hub/hub") == Mount(HUB, "hub")
    assert TABLE.token_mount("hub/ghcr") is None
    assert TABLE.token_mount("quay/") == Mount(QUAY)
    assert TABLE.token_mount("nope") is None
    assert TABLE.token_mount("own/x") is None


DEFAULT_MOUNT = Mount(OWN, None, frozenset({"hub", "ghcr"}))


@pytest.mark.parametrize("rest", ["own", ""])
@pytest.mark.parametrize(
    ("scopes", "mount"),
    [
        # docker and skopeo ask the realm of their /v2/ ping, the default route's, for
        # every repository, with the names they pulled: path routes must get theirs.
        (["repository:hub/library/alpine:pull"], Mount(HUB, "hub")),
        (["registry:catalog:* repository:ghcr/org/app:pull"], Mount(GHCR, "ghcr")),
        (["repository:team/app:pull"], DEFAULT_MOUNT),
        (["repository:hub:pull"], DEFAULT_MOUNT),
        ([], DEFAULT_MOUNT),
        (["malformed", "repository:hub/x:pull"], Mount(HUB, "hub")),
    ],
)
def test_the_default_realm_dispatches_path_scopes(
    rest: str, scopes: list[str], mount: Mount
) -> None:
    assert TABLE.token_mount(rest, scopes) == mount


def test_the_empty_realm_without_a_default_route() -> None:
    table = RouteTable((HUB, GHCR))
    assert table.token_mount("", ["repository:ghcr/a:pull"]) == Mount(GHCR, "ghcr")
    assert table.token_mount("", ["repository:other/a:pull"]) is None


def test_a_host_route_realm_does_not_dispatch() -> None:
    assert TABLE.token_mount("quay", ["repository:hub/x:pull"]) == Mount(QUAY)


def test_mixed_routes_in_one_token_request_keep_the_first_routes_scopes() -> None:
    scopes = ["repository:hub/alpine:pull", "repository:ghcr/a:pull", "repository:x/y:pull"]
    mount = TABLE.token_mount("own", scopes)
    assert mount is not None
    assert mount.upstream_scopes(scopes) == ["repository:library/alpine:pull"]


def test_the_default_route_drops_shadowed_names() -> None:
    match = TABLE.match(None, None, "team/app")
    assert match is not None and match.mount == DEFAULT_MOUNT
    assert match.mount.upstream_scopes(
        ["repository:team/app:pull", "repository:hub:pull", "repository:ghcr/x/y:pull"]
    ) == ["repository:mirror/team/app:pull"]
    # _catalog leaves out what no client can pull through the default route.
    names = ["mirror/app", "mirror/hub/tools", "mirror/hubx"]
    assert [match.mount.catalog_name(name) for name in names] == ["app", None, "hubx"]


# The allow-list.


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("library/alpine", True),
        ("alpine", True),  # Docker Hub: alpine is library/alpine
        ("library/a/b", False),  # * stays within one component
        ("myorg/app", True),
        ("myorg/team/app", True),  # ** crosses components
        ("myorg", True),  # checked as library/myorg, which library/* allows
        ("other/app", False),
        ("myorgx/app", False),
    ],
)
def test_allow_globs_on_docker_hub(name: str, ok: bool) -> None:
    assert allowed(HUB, name) is ok


@pytest.mark.parametrize(
    ("patterns", "name", "ok"),
    [
        (("team/*",), "team", False),
        (("team/**",), "team", False),
        (("team/**",), "team/a/b/c", True),
        (("**/app",), "app", True),
        (("**/app",), "a/b/app", True),
        (("**/app",), "a/b/apps", False),
        (("**",), "any/thing/at/all", True),
        (("a*c",), "abc", True),
        (("a*c",), "a/c", False),
        (("a.b",), "axb", False),  # dots are literal
        (("x", "y/*"), "y/z", True),
    ],
)
def test_allow_glob_semantics(patterns: tuple[str, ...], name: str, ok: bool) -> None:
    route = Route(Upstream("https", "quay.io"), allow=patterns)
    assert route.allows(name) is ok


def test_no_allow_list_allows_everything() -> None:
    assert Route(Upstream("https", "quay.io")).allows("any/thing")
    assert compile_globs(()) is None


def test_a_denied_name_matches_but_is_not_allowed() -> None:
    match = TABLE.match(None, "docker.io", "someone/else")
    assert match is not None and not match.allowed
    base = TABLE.match(None, "docker.io", None)
    assert base is not None and base.allowed and base.upstream_name == ""


COMPONENT = st.from_regex(re.compile(r"[a-z0-9]{1,6}"), fullmatch=True)
NAMES = st.lists(COMPONENT, min_size=1, max_size=5).map("/".join)


@given(NAMES)
def test_a_literal_glob_allows_only_itself(name: str) -> None:
    route = Route(Upstream("https", "quay.io"), allow=(name,))
    assert route.allows(name)
    assert not route.allows(name + "x")
    assert not route.allows(name + "/x")


@given(NAMES, NAMES)
def test_star_never_crosses_a_component(head: str, tail: str) -> None:
    route = Route(Upstream("https", "quay.io"), allow=(f"{head}/*",))
    assert route.allows(f"{head}/{tail}") is ("/" not in tail)


@given(NAMES, NAMES)
def test_double_star_allows_everything_below(head: str, tail: str) -> None:
    route = Route(Upstream("https", "quay.io"), allow=(f"{head}/**",))
    assert route.allows(f"{head}/{tail}")
    assert not route.allows(f"{head}x/{tail}")


# Token scopes per route.


def test_route_scopes_prefix_pull_only_and_drop_denied() -> None:
    scopes = [
        "repository:library/alpine:pull,push",
        "repository:someone/else:pull",  # outside the allow-list: dropped
        "repository:myorg/app:push",  # push only: dropped
        "repository:ubuntu:pull registry:catalog:*",
    ]
    assert route_scopes(HUB, scopes) == [
        "repository:library/alpine:pull",
        "repository:library/ubuntu:pull",
        "registry:catalog:*",
    ]


def test_mounted_scopes_lose_the_component_and_drop_names_outside_it() -> None:
    mount = Mount(HUB, "hub")
    assert mount.upstream_scopes(
        ["repository:hub/alpine:pull", "repository:library/alpine:pull", "repository:hub:pull"]
    ) == ["repository:library/alpine:pull"]


def test_route_scopes_with_a_prefix() -> None:
    assert route_scopes(OWN, ["repository:team/app:pull"]) == ["repository:mirror/team/app:pull"]


@pytest.mark.parametrize("scope", ["repository:UPPER/x:pull", "repository:x"])
def test_route_scopes_still_refuse_malformed_scopes(scope: str) -> None:
    with pytest.raises(OCIError) as caught:
        route_scopes(HUB, [scope])
    assert caught.value.status == 400


def test_challenge_scopes_come_back_in_client_names() -> None:
    upstream = "repository:mirror/team/app:pull repository:elsewhere/x:pull"
    assert Mount(OWN).client_scopes(upstream) == (
        "repository:team/app:pull repository:elsewhere/x:pull"
    )
    assert Mount(GHCR, "ghcr").client_scopes("repository:org/app:pull") == (
        "repository:ghcr/org/app:pull"
    )
