"""[auth], [limits], pull and [[routes.access]] in the routes file: loaded, or every error
named with its route and key; htpasswd and token key read at load, never shown."""

from __future__ import annotations

import textwrap
from pathlib import Path

import bcrypt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from regproxy.config import AccessRule, ConfigError, RateLimit
from regproxy.routing.load import check_config, load_routes
from regproxy.routing.load_access import access_options, read_htpasswd

ALICE_HASH = bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(4)).decode()


def key_pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "users.htpasswd").write_text(f"# users\nalice:{ALICE_HASH}\n\nbob:{ALICE_HASH}\n")
    (tmp_path / "token-key.pem").write_bytes(key_pem(ec.generate_private_key(ec.SECP256R1())))
    return tmp_path


def write(directory: Path, text: str) -> Path:
    path = directory / "routes.toml"
    path.write_text(textwrap.dedent(text))
    return path


ISSUE_EXAMPLE = """\
[auth]
htpasswd = "users.htpasswd"
token_key = "token-key.pem"
token_ttl = 300
groups = { ops = ["alice", "bob"] }

[[auth.oidc]]
name = "github"
issuer = "https://token.actions.githubusercontent.com"
audience = "r.example.com"
username_claim = "sub"

[limits]
anonymous = "100/6h"
users = "5000/6h"

[[routes]]
name = "own"
upstream = "registry.example.com"
pull = ["users"]
  [[routes.access]]
  repos = ["public/**"]
  pull = ["anonymous"]
  [[routes.access]]
  repos = ["team-a/**"]
  pull = ["@ops", "alice", "github:repo:acme/a:*"]
"""


def test_the_issues_example_loads(files: Path) -> None:
    table = load_routes(write(files, ISSUE_EXAMPLE))
    auth, limits = table.auth, table.limits
    assert auth is not None and limits is not None
    assert set(auth.users) == {"alice", "bob"}
    assert auth.users["alice"] == ALICE_HASH.encode()
    assert auth.token_key_pem is not None and auth.token_ttl == 300.0
    assert dict(auth.groups) == {"ops": ("alice", "bob")}
    assert [o.name for o in auth.oidc] == ["github"]
    assert limits.anonymous == RateLimit(100, 21600.0) and limits.users == RateLimit(5000, 21600)
    assert table.routes[0].access == (
        AccessRule(("public/**",), ("anonymous",)),
        AccessRule(("team-a/**",), ("@ops", "alice", "github:repo:acme/a:*")),
        # pull = [...] covers what the entries leave, last.
        AccessRule(("**",), ("users",)),
    )


def test_without_auth_nothing_changes(tmp_path: Path) -> None:
    table = load_routes(write(tmp_path, '[[routes]]\nname = "a"\nupstream = "docker.io"\n'))
    assert table.auth is None and table.limits is None and table.routes[0].access == ()


def test_secrets_are_not_shown(files: Path) -> None:
    table = load_routes(write(files, ISSUE_EXAMPLE))
    assert ALICE_HASH not in repr(table) and "PRIVATE" not in repr(table)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[routes]]\nname = "a"\nupstream = "docker.io"\npull = ["users"]\n',
            'route "a": pull and access need an [auth] table',
        ),
        (
            '[auth]\n[[routes]]\nname = "a"\nupstream = "docker.io"\npull = ["@nobody"]\n',
            'route "a": pull: "@nobody": no group "nobody" in [auth] groups',
        ),
        (
            '[auth]\n[[routes]]\nname = "a"\nupstream = "docker.io"\npull = ["gh:*"]\n',
            'route "a": pull: "gh:*": no [[auth.oidc]] named "gh"',
        ),
        (
            '[auth]\n[[routes]]\nname = "a"\nupstream = "docker.io"\npull = "users"\n',
            'route "a": pull must be a list of principals',
        ),
        (
            '[auth]\n[[routes]]\nname = "a"\nupstream = "docker.io"\n'
            '[[routes.access]]\nrepos = ["x/**"]\n',
            'route "a": access #1: pull is required',
        ),
        (
            '[auth]\n[[routes]]\nname = "a"\nupstream = "docker.io"\n'
            '[[routes.access]]\nrepos = ["/x"]\npull = []\n',
            'route "a": access #1: repos "/x": no leading, trailing or double slashes',
        ),
        (
            '[auth]\n[[routes]]\nname = "a"\nupstream = "docker.io"\n'
            '[[routes.access]]\nrepos = ["x"]\npull = []\npush = ["alice"]\n',
            'route "a": access #1: unknown key "push"',
        ),
        (
            # Would be the routes' default (users only), not the nobody it reads as.
            '[auth]\n[[routes]]\nname = "a"\nupstream = "docker.io"\naccess = []\n',
            'route "a": access is empty',
        ),
        (
            '[auth]\ntoken_ttl = 0\n[[routes]]\nname = "a"\nupstream = "docker.io"\n',
            "auth: token_ttl",
        ),
        (
            '[auth]\nhtpasswd = "missing"\n[[routes]]\nname = "a"\nupstream = "docker.io"\n',
            "auth: htpasswd: cannot read",
        ),
        (
            '[auth]\nsecret = 1\n[[routes]]\nname = "a"\nupstream = "docker.io"\n',
            'auth: unknown key "secret"',
        ),
        (
            '[limits]\nusers = "lots"\n[[routes]]\nname = "a"\nupstream = "docker.io"\n',
            "limits: users:",
        ),
        (
            '[limits]\nredis = "http://x"\n[[routes]]\nname = "a"\nupstream = "docker.io"\n',
            "limits: redis",
        ),
        (
            '[auth]\n[[auth.oidc]]\nname = "ci"\nissuer = "http://i"\naudience = "a"\n'
            '[[routes]]\nname = "a"\nupstream = "docker.io"\n',
            'auth.oidc "ci": issuer must be an https:// URL',
        ),
        (
            '[auth]\n[[auth.oidc]]\nname = "ci"\nissuer = "https://i"\n'
            '[[routes]]\nname = "a"\nupstream = "docker.io"\n',
            'auth.oidc "ci": audience is required',
        ),
    ],
)
def test_errors_name_the_table_and_the_key(tmp_path: Path, text: str, expected: str) -> None:
    errors = check_config(write(tmp_path, text))
    assert any(expected in error for error in errors), errors


def test_an_empty_access_list_with_pull_loads(tmp_path: Path) -> None:
    text = '[auth]\n[[routes]]\nname = "a"\nupstream = "docker.io"\naccess = []\npull = []\n'
    assert check_config(write(tmp_path, text)) == []


def test_every_error_of_the_file_at_once(tmp_path: Path) -> None:
    text = (
        '[auth]\ntoken_ttl = -1\n[limits]\nanonymous = "x"\n'
        '[[routes]]\nname = "a"\nupstream = "docker.io"\npull = ["@none"]\n'
    )
    assert len(check_config(write(tmp_path, text))) == 3


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("alice:$apr1$abcdefgh$0123456789012345678901", "MD5 (apr1)"),
        ("alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "non-bcrypt"),
        ("alice:plaintext", "non-bcrypt"),
    ],
)
def test_htpasswd_entries_other_than_bcrypt_are_refused_naming_the_line(
    tmp_path: Path, line: str, kind: str
) -> None:
    path = tmp_path / "users"
    path.write_text(f"bob:{ALICE_HASH}\n{line}\n")
    with pytest.raises(ValueError) as caught:
        read_htpasswd(str(path))
    message = str(caught.value)
    assert "line 2" in message and kind in message and "alice" in message
    assert line.partition(":")[2] not in message  # not the hash


@pytest.mark.parametrize(
    "line", ["anonymous:HASH", "users:HASH", "@ops:HASH", "nocolon", "a b:HASH"]
)
def test_reserved_or_malformed_user_names_are_refused(tmp_path: Path, line: str) -> None:
    path = tmp_path / "users"
    path.write_text(line.replace("HASH", ALICE_HASH) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        read_htpasswd(str(path))


def test_a_user_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"bob:{ALICE_HASH}\nbob:{ALICE_HASH}\n")
    with pytest.raises(ValueError, match=r"line 2.*twice"):
        read_htpasswd(str(path))


@pytest.mark.parametrize(
    "key",
    [ec.generate_private_key(ec.SECP384R1()), rsa.generate_private_key(65537, 2048)],
    ids=["p384", "rsa"],
)
def test_a_token_key_that_is_not_p256_is_refused(tmp_path: Path, key: object) -> None:
    (tmp_path / "k.pem").write_bytes(key_pem(key))
    text = '[auth]\ntoken_key = "k.pem"\n[[routes]]\nname = "a"\nupstream = "docker.io"\n'
    errors = check_config(write(tmp_path, text))
    assert any("auth: token_key:" in e and "not an EC P-256 key" in e for e in errors), errors
    assert not any("PRIVATE" in e for e in errors)


def options(**values: object) -> dict[str, object]:
    found: dict[str, object] = {"htpasswd": None, "insecure-auth": False, "workers": 1}
    found.update(values)
    return found


def test_htpasswd_on_the_command_line(files: Path) -> None:
    auth = access_options(options(htpasswd=str(files / "users.htpasswd")), None)
    assert auth is not None and set(auth.users) == {"alice", "bob"} and not auth.insecure
    insecure = access_options(
        options(htpasswd=str(files / "users.htpasswd"), **{"insecure-auth": True}), None
    )
    assert insecure is not None and insecure.insecure


def test_insecure_auth_alone_is_an_error() -> None:
    with pytest.raises(ValueError, match="--insecure-auth goes with"):
        access_options(options(**{"insecure-auth": True}), None)


def test_workers_need_a_shared_token_key(files: Path) -> None:
    with pytest.raises(ValueError, match="token_key"):
        access_options(options(htpasswd=str(files / "users.htpasswd"), workers=2), None)
    table = load_routes(write(files, ISSUE_EXAMPLE))
    assert access_options(options(workers=2), table.auth) is not None


def test_a_bad_htpasswd_option_names_the_option(tmp_path: Path) -> None:
    (tmp_path / "u").write_text("alice:plain\n")
    with pytest.raises(ValueError, match=r"^--htpasswd: .*line 1"):
        access_options(options(htpasswd=str(tmp_path / "u")), None)


def test_config_error_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_routes(
            write(tmp_path, '[auth]\nfoo = 1\n[[routes]]\nname = "a"\nupstream = "docker.io"\n')
        )


def test_an_oidc_name_that_is_also_a_user_is_refused(files: Path) -> None:
    text = ISSUE_EXAMPLE.replace('name = "github"', 'name = "alice"').replace(
        "github:repo", "alice:repo"
    )
    errors = check_config(write(files, text))
    assert errors == ['auth.oidc "alice": the htpasswd file has a user of that name']
