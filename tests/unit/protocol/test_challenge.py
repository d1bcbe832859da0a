"""WWW-Authenticate parsing (several challenges, quoting, token68) and rewriting."""

from __future__ import annotations

import pytest

from regproxy.config import Route, Upstream
from regproxy.protocol import challenge
from regproxy.protocol.challenge import Challenge
from regproxy.protocol.headers import rewrite_challenges

ROUTE = Route(Upstream("https", "gcr.example"), prefix="proj")
REALM = "http://proxy.example/_token"


def test_bearer_with_all_params() -> None:
    value = (
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:proj/app:pull",error="insufficient_scope"'
    )
    assert challenge.parse(value) == [
        Challenge(
            "Bearer",
            (
                ("realm", "https://auth.example/token"),
                ("service", "registry.example"),
                ("scope", "repository:proj/app:pull"),
                ("error", "insufficient_scope"),
            ),
        )
    ]


def test_several_challenges_in_one_value() -> None:
    value = 'Basic realm="basic, realm", Bearer realm="https://a/t", service=reg , Negotiate'
    assert challenge.parse(value) == [
        Challenge("Basic", (("realm", "basic, realm"),)),
        Challenge("Bearer", (("realm", "https://a/t"), ("service", "reg"))),
        Challenge("Negotiate"),
    ]


def test_several_headers() -> None:
    assert challenge.parse_all(['Bearer realm="https://a/t"', 'Basic realm="b"']) == [
        Challenge("Bearer", (("realm", "https://a/t"),)),
        Challenge("Basic", (("realm", "b"),)),
    ]


def test_quoted_strings_with_escapes_and_commas() -> None:
    value = r'Bearer realm="https://a/t?x=1,2", service="say \"hi\", then \\ go", scope="a b"'
    [parsed] = challenge.parse(value)
    assert parsed.get("realm") == "https://a/t?x=1,2"
    assert parsed.get("service") == 'say "hi", then \\ go'
    assert parsed.get("scope") == "a b"


def test_parameter_names_are_case_insensitive_and_whitespace_tolerated() -> None:
    [parsed] = challenge.parse('Bearer   Realm = "https://a/t" ,SERVICE=reg')
    assert parsed.params == (("realm", "https://a/t"), ("service", "reg"))
    assert parsed.is_bearer
    assert Challenge("bEaReR").is_bearer
    assert not Challenge("Basic").is_bearer


def test_ecr_basic_realm() -> None:
    [parsed] = challenge.parse(
        'Basic realm="https://123.dkr.ecr.us-east-1.amazonaws.com/",service="ecr.amazonaws.com"'
    )
    assert parsed.scheme == "Basic"
    assert not parsed.is_bearer
    assert parsed.get("realm") == "https://123.dkr.ecr.us-east-1.amazonaws.com/"
    assert parsed.get("service") == "ecr.amazonaws.com"


def test_token68() -> None:
    assert challenge.parse("Negotiate abc+/def==, Bearer realm=x") == [
        Challenge("Negotiate", token68="abc+/def=="),
        Challenge("Bearer", (("realm", "x"),)),
    ]


def test_unparseable_values_do_not_raise() -> None:
    assert challenge.parse("") == []
    assert challenge.parse(" , ,") == []
    assert challenge.parse('"junk", Bearer realm=x') == [Challenge("Bearer", (("realm", "x"),))]
    # An unterminated quoted string runs to the end.
    assert challenge.parse('Bearer realm="https://a/t') == [
        Challenge("Bearer", (("realm", "https://a/t"),))
    ]


@pytest.mark.parametrize(
    "item",
    [
        Challenge("Bearer", (("realm", "https://a/t"), ("service", 'q"uo\\te, d'))),
        Challenge("Basic", (("realm", ""),)),
        Challenge("Negotiate", token68="abc=="),
        Challenge("Negotiate"),
    ],
)
def test_render_round_trip(item: Challenge) -> None:
    assert challenge.parse(item.render()) == [item]


def test_with_param_and_get() -> None:
    item = Challenge("Bearer", (("realm", "a"), ("service", "s")))
    assert item.with_param("realm", "b") == Challenge("Bearer", (("realm", "b"), ("service", "s")))
    assert item.with_param("scope", "x") == item  # only replaces, never adds
    assert item.get("missing") is None


def test_rewrite_challenges() -> None:
    values = [
        'Bearer realm="https://auth.example/token",service="gcr.example",'
        'scope="repository:proj/app:pull repository:proj/b:pull",error="insufficient_scope"',
        'Basic realm="https://gcr.example/"',
    ]
    out = rewrite_challenges(values, REALM, ROUTE.client_name)
    assert challenge.parse_all(out) == [
        Challenge(
            "Bearer",
            (
                ("realm", REALM),
                ("service", "gcr.example"),
                ("scope", "repository:app:pull repository:b:pull"),
                ("error", "insufficient_scope"),
            ),
        ),
        Challenge("Basic", (("realm", "https://gcr.example/"),)),
    ]
    assert "proj" not in out[0]


def test_rewrite_challenges_several_in_one_value() -> None:
    [out] = rewrite_challenges(
        ['Basic realm="b", Bearer realm="https://a/t",scope="repository:proj/x:pull"'],
        REALM,
        ROUTE.client_name,
    )
    assert challenge.parse(out) == [
        Challenge("Basic", (("realm", "b"),)),
        Challenge("Bearer", (("realm", REALM), ("scope", "repository:x:pull"))),
    ]


def test_rewrite_challenges_leaves_unparseable_values() -> None:
    assert rewrite_challenges(["", '"x"'], REALM, ROUTE.client_name) == ["", '"x"']


def test_rewrite_challenges_bearer_without_realm_gets_none() -> None:
    [out] = rewrite_challenges(['Bearer error="invalid_token"'], REALM, ROUTE.client_name)
    assert challenge.parse(out) == [Challenge("Bearer", (("error", "invalid_token"),))]
