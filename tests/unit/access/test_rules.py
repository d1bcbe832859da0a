"""The rule matcher: first matching rule wins, no match denies, principals as documented."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regproxy.access.rules import ANONYMOUS, RouteRules, memberships
from regproxy.config import AccessRule, Route, Upstream

UPSTREAM = Upstream("https", "upstream.example")
GROUPS = {"ops": ("bob", "ci:repo:acme/a:main"), "devs": ("alice", "bob")}


def rules(*entries: AccessRule, upstream: Upstream = UPSTREAM) -> RouteRules:
    return RouteRules.of(Route(upstream, name="r", access=tuple(entries)))


def admits(matcher: RouteRules, principal: str, name: str) -> bool:
    return matcher.admits(principal, memberships(GROUPS).get(principal, frozenset()), name)


EXAMPLE = rules(
    AccessRule(("public/**",), ("anonymous",)),
    AccessRule(("team-a/**",), ("@ops", "alice", "ci:repo:acme/a:*")),
    AccessRule(("nobody/**",), ()),
    AccessRule(("**",), ("users",)),
)


@pytest.mark.parametrize(
    ("principal", "name", "expected"),
    [
        (ANONYMOUS, "public/x", True),
        ("alice", "public/x", True),  # anonymous admits everyone
        (ANONYMOUS, "team-a/app", False),
        ("alice", "team-a/app", True),
        ("bob", "team-a/app", True),  # @ops
        ("carol", "team-a/app", False),  # first match decides, "users" comes later
        ("ci:repo:acme/a:ref:refs/heads/main", "team-a/app", True),  # * spans / and :
        ("ci:repo:acme/b:ref:refs/heads/main", "team-a/app", False),
        ("other:repo:acme/a:main", "team-a/app", False),  # another issuer's subject
        ("gh:repo:acme/a:main", "team-a/app", False),  # ... with a name as long as "ci"
        ("alice", "nobody/x", False),
        ("carol", "anything/else", True),
        (ANONYMOUS, "anything/else", False),
        ("ci:repo:acme/a:main", "team-a/deep/er", True),
    ],
)
def test_the_example_rules(principal: str, name: str, expected: bool) -> None:
    assert admits(EXAMPLE, principal, name) is expected


def test_no_matching_rule_denies() -> None:
    matcher = rules(AccessRule(("a/**",), ("users",)))
    assert not admits(matcher, "alice", "b/x")


def test_a_route_without_rules_admits_users_only() -> None:
    matcher = rules()
    assert admits(matcher, "alice", "any/thing")
    assert not admits(matcher, ANONYMOUS, "any/thing")


def test_docker_hub_names_are_matched_with_library() -> None:
    hub = Upstream("https", "registry-1.docker.io")
    matcher = rules(AccessRule(("library/*",), ("anonymous",)), upstream=hub)
    assert admits(matcher, ANONYMOUS, "alpine")
    assert not admits(
        rules(AccessRule(("alpine",), ("anonymous",)), upstream=hub), ANONYMOUS, "alpine"
    )


# -- the property: the matcher agrees with a plain reading of the documentation ----------


def glob_matches(pattern: str, name: str) -> bool:
    """``*`` within a component, ``**`` across, ``**/`` also nothing: written naively."""
    if not pattern:
        return not name
    if pattern.startswith("**/"):
        rest = pattern[3:]
        return glob_matches(rest, name) or any(
            name[i] == "/" and glob_matches(rest, name[i + 1 :]) for i in range(len(name))
        )
    if pattern.startswith("**"):
        return any(glob_matches(pattern[2:], name[i:]) for i in range(len(name) + 1))
    if pattern[0] == "*":
        return any(
            glob_matches(pattern[1:], name[i:])
            for i in range(len(name) + 1)
            if "/" not in name[:i]
        )
    return bool(name) and name[0] == pattern[0] and glob_matches(pattern[1:], name[1:])


def reference(entries: list[AccessRule], principal: str, name: str) -> bool:
    for rule in entries:
        if any(glob_matches(pattern, name) for pattern in rule.repos):
            return any(one_admits(p, principal) for p in rule.pull)
    return False


def one_admits(entry: str, principal: str) -> bool:
    if entry == "anonymous":
        return True
    if principal == ANONYMOUS:
        return False
    if entry == "users" or entry == principal:
        return True
    if entry.startswith("@"):
        return principal in GROUPS.get(entry[1:], ())
    if ":" in entry:
        issuer, _, glob = entry.partition(":")
        head, _, subject = principal.partition(":")
        return ":" in principal and head == issuer and fnmatch.fnmatchcase(subject, glob)
    return False


components = st.sampled_from(["a", "b", "ab", "x-y", "a.b"])
names = st.lists(components, min_size=1, max_size=4).map("/".join)
pattern_parts = st.sampled_from(["a", "b", "ab", "*", "**", "a*", "*b", "x-y"])
patterns = st.lists(pattern_parts, min_size=1, max_size=4).map("/".join)
subjects = st.lists(
    st.sampled_from(["repo", "acme/a", "main", "x", "*"]), min_size=1, max_size=3
).map(":".join)
principals = st.one_of(
    st.just(ANONYMOUS),
    st.sampled_from(["alice", "bob", "carol"]),
    subjects.map(lambda s: "ci:" + s.replace("*", "y")),
    subjects.map(lambda s: "gh:" + s.replace("*", "y")),
)
pull_entries = st.one_of(
    st.sampled_from(["anonymous", "users", "alice", "bob", "@ops", "@devs"]),
    subjects.map(lambda s: "ci:" + s),
)
access_rules = st.builds(
    lambda repos, pull: AccessRule(tuple(repos), tuple(pull)),
    st.lists(patterns, min_size=1, max_size=3),
    st.lists(pull_entries, max_size=4),
)


@given(st.lists(access_rules, min_size=1, max_size=5), principals, names)
def test_the_matcher_agrees_with_the_documented_reading(
    entries: list[AccessRule], principal: str, name: str
) -> None:
    assert admits(rules(*entries), principal, name) is reference(entries, principal, name)


@given(st.lists(access_rules, max_size=5), principals, names)
def test_anonymous_never_gets_more_than_a_user(
    entries: list[AccessRule], principal: str, name: str
) -> None:
    matcher = rules(*entries)
    if admits(matcher, ANONYMOUS, name):
        assert admits(matcher, principal, name)
