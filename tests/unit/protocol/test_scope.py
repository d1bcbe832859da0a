"""Token scopes between client names and the upstream's prefixed names."""

from __future__ import annotations

import pytest

from regproxy.config import Route, Upstream
from regproxy.protocol.errors import OCIError
from regproxy.protocol.scope import Scope, rewrite_down, rewrite_up, split_scopes

PREFIXED = Route(Upstream("https", "gcr.example"), prefix="proj/mirror")
HUB = Route(Upstream("https", "registry-1.docker.io"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("repository:team/app:pull", Scope("repository", "team/app", ("pull",))),
        ("repository:team/app:pull,push", Scope("repository", "team/app", ("pull", "push"))),
        (
            "repository:localhost:5000/foo:pull",
            Scope("repository", "localhost:5000/foo", ("pull",)),
        ),
        ("registry:catalog:*", Scope("registry", "catalog", ("*",))),
        ("repository(plugin):x:pull", Scope("repository(plugin)", "x", ("pull",))),
        ("repository:a:", Scope("repository", "a", ())),
        ("repository:a:pull,,push", Scope("repository", "a", ("pull", "push"))),
    ],
)
def test_parse(text: str, expected: Scope) -> None:
    assert Scope.parse(text) == expected


@pytest.mark.parametrize("text", ["repository", "repository:a", ":a:pull", "", "a"])
def test_parse_malformed(text: str) -> None:
    with pytest.raises(OCIError) as caught:
        Scope.parse(text)
    assert (caught.value.code, caught.value.status) == ("REQUEST_INVALID", 400)


@pytest.mark.parametrize(
    "text",
    ["repository:team/app:pull", "registry:catalog:*", "repository:localhost:5000/foo:pull,push"],
)
def test_str_round_trip(text: str) -> None:
    assert str(Scope.parse(text)) == text


def test_is_repository() -> None:
    assert Scope.parse("repository:a:pull").is_repository
    assert Scope.parse("repository(plugin):a:pull").is_repository
    assert not Scope.parse("registry:catalog:*").is_repository
    assert not Scope.parse("repositoryx:a:pull").is_repository


def test_split_scopes() -> None:
    assert split_scopes(["a:b:c  d:e:f", "", "g:h:i"]) == ["a:b:c", "d:e:f", "g:h:i"]


def test_rewrite_up_repeated_and_space_separated() -> None:
    values = [
        "repository:team/app:pull",
        "repository:a:pull,push repository:b:push",
        "registry:catalog:*",
        "repository(plugin):x:pull",
        "repository:c:*",
    ]
    assert rewrite_up(values, PREFIXED.upstream_name) == [
        "repository:proj/mirror/team/app:pull",
        "repository:proj/mirror/a:pull",
        "registry:catalog:*",
        "repository(plugin):proj/mirror/x:pull",
        "repository:proj/mirror/c:pull",
    ]


def test_rewrite_up_drops_push_only_scopes() -> None:
    assert (
        rewrite_up(["repository:a:push", "repository:b:delete,push"], PREFIXED.upstream_name) == []
    )


def test_rewrite_up_docker_hub_library() -> None:
    assert rewrite_up(["repository:ubuntu:pull repository:me/app:pull"], HUB.upstream_name) == [
        "repository:library/ubuntu:pull",
        "repository:me/app:pull",
    ]


@pytest.mark.parametrize(
    "value",
    ["repository:A:pull", "repository:a/../b:pull", "repository::pull", "repository:a//b:pull"],
)
def test_rewrite_up_rejects_invalid_names(value: str) -> None:
    with pytest.raises(OCIError) as caught:
        rewrite_up([value], PREFIXED.upstream_name)
    assert (caught.value.code, caught.value.status) == ("NAME_INVALID", 400)


def test_rewrite_up_rejects_malformed_scopes() -> None:
    with pytest.raises(OCIError) as caught:
        rewrite_up(["repository:a"], PREFIXED.upstream_name)
    assert caught.value.code == "REQUEST_INVALID"


def test_rewrite_down_strips_the_prefix() -> None:
    assert (
        rewrite_down("repository:proj/mirror/team/app:pull", PREFIXED.client_name)
        == "repository:team/app:pull"
    )


def test_rewrite_down_leaves_other_scopes_alone() -> None:
    value = (
        "repository:proj/mirror/a:pull,push repository:elsewhere/b:pull "
        "registry:catalog:* nonsense repository(plugin):proj/mirror/c:pull"
    )
    assert rewrite_down(value, PREFIXED.client_name) == (
        "repository:a:pull,push repository:elsewhere/b:pull "
        "registry:catalog:* nonsense repository(plugin):c:pull"
    )


def test_rewrite_down_the_prefix_itself_is_outside() -> None:
    assert rewrite_down("repository:proj/mirror:pull", PREFIXED.client_name) == (
        "repository:proj/mirror:pull"
    )


def test_rewrite_down_without_prefix_is_identity() -> None:
    value = "repository:library/ubuntu:pull repository:a:pull"
    assert rewrite_down(value, HUB.client_name) == value
