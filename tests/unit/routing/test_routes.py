"""Loading routes from a TOML file: every key, every error at once, secrets read at load."""

from __future__ import annotations

import json
import string
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regproxy.config import (
    DOCKER_HUB_URL,
    BlobRedirects,
    Config,
    ConfigError,
    Credentials,
    Route,
    Upstream,
    known_upstream,
)
from regproxy.routing.load import ROUTE_KEYS, check_config, load_routes, read_table
from regproxy.routing.matching import RouteTable

if sys.version_info >= (3, 11):
    pass
else:
    pass


def write(tmp_path: Path, text: str, name: str = "routes.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(tmp_path: Path, text: str) -> list[str]:
    return check_config(write(tmp_path, text))


README_EXAMPLE = """\
[[routes]]
name = "hub"
upstream = "docker.io"
path = "hub"
namespace = "docker.io"

[[routes]]
name = "ghcr"
upstream = "ghcr.io"
path = "ghcr"

[[routes]]
name = "own"
upstream = "https://registry.example.com"
username = "bot"
password_file = "password"
"""


def test_every_key_is_parsed_into_the_route(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("s3cret\n")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    path = write(
        tmp_path,
        """
        [[routes]]
        name = "hub"
        upstream = "docker.io"
        repo_prefix = "/mirror/"
        host = "Docker.R.Example.com"
        path = "hub"
        namespace = "Docker.io"
        allow = ["library/*", "myorg/**"]
        upstream_ca = "ca.pem"
        blob_redirects = "follow"
        cache = false
        username = "bot"
        password_file = "password"
        """,
    )
    assert load_routes(path).routes == (
        Route(
            upstream=Upstream("https", "registry-1.docker.io"),
            prefix="mirror",
            credentials=Credentials(username="bot", password="s3cret"),
            blob_redirects=BlobRedirects.FOLLOW,
            upstream_ca=str(tmp_path / "ca.pem"),
            name="hub",
            host="docker.r.example.com",
            path="hub",
            namespace="docker.io",
            allow=("library/*", "myorg/**"),
            cache=False,
        ),
    )


def test_defaults_of_a_minimal_route(tmp_path: Path) -> None:
    table = load_routes(write(tmp_path, '[[routes]]\nname = "a"\nupstream = "quay.io"\n'))
    assert table.routes == (Route(Upstream("https", "quay.io"), name="a"),)
    assert table.default == table.routes[0]
    assert table.routes[0].cache


def test_the_readme_example_loads(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("pw")
    table = load_routes(write(tmp_path, README_EXAMPLE))
    assert [route.name for route in table.routes] == ["hub", "ghcr", "own"]
    assert table.default is not None and table.default.name == "own"


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("docker.io", DOCKER_HUB_URL),
        ("DOCKER.IO", DOCKER_HUB_URL),
        ("ghcr.io", "https://ghcr.io"),
        ("quay.io", "https://quay.io"),
        ("gcr.io", "https://gcr.io"),
        ("eu.gcr.io", "https://eu.gcr.io"),
        ("registry.k8s.io", "https://registry.k8s.io"),
        ("public.ecr.aws", "https://public.ecr.aws"),
        ("europe-west1-docker.pkg.dev", "https://europe-west1-docker.pkg.dev"),
        ("registry.example.com", None),
        ("docker.pkg.dev", None),
        ("evil.gcr.io.example.com", None),
    ],
)
def test_known_upstream_names(name: str, url: str | None) -> None:
    assert known_upstream(name) == url


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("docker.io", Upstream("https", "registry-1.docker.io")),
        ("us.gcr.io", Upstream("https", "us.gcr.io")),
        ("registry.example.com:5000", Upstream("https", "registry.example.com:5000")),
        ("http://127.0.0.1:5000", Upstream("http", "127.0.0.1:5000")),
    ],
)
def test_upstream_known_name_url_or_bare_host(text: str, expected: Upstream) -> None:
    assert Upstream.from_name(text) == expected


def test_docker_io_keeps_the_library_rule() -> None:
    route = Route(Upstream.from_name("docker.io"))
    assert route.library_names
    assert route.upstream_name("alpine") == "library/alpine"


def test_unknown_keys_name_the_key_and_the_route(tmp_path: Path) -> None:
    assert errors_of(
        tmp_path,
        """
        colour = "blue"
        [[routes]]
        name = "hub"
        upstream = "docker.io"
        usename = "bot"
        """,
    ) == [
        'unknown top-level key "colour"',
        'route "hub": unknown key "usename" (did you mean "username"?)',
    ]


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        [[routes]]
        upstream = "quay.io"
        [[routes]]
        name = "Bad_Name"
        upstream = "ftp://x"
        [[routes]]
        name = "c"
        upstream = "quay.io"
        host = "a.example.com:8080"
        path = "two/parts"
        namespace = "no/slash"
        repo_prefix = "UPPER"
        blob_redirects = "sometimes"
        cache = "yes"
        allow = ["Library/*"]
        """,
    )
    assert errors == [
        "route #1: name is required",
        'route "Bad_Name": name: "Bad_Name" is not a valid route name '
        '(lower-case letters, digits and "-")',
        "route \"Bad_Name\": upstream: the scheme must be http or https, not 'ftp'",
        "route \"c\": repo_prefix: 'UPPER' is not a valid repository path",
        'route "c": host: "a.example.com:8080": give the host name without a port '
        "(ports are ignored)",
        'route "c": path: "two/parts" is not one repository name component (such as hub or ghcr)',
        'route "c": namespace: "no/slash" is not a registry host name such as docker.io',
        'route "c": allow: "Library/*": use repository name characters with * (one component) '
        "and ** (any depth)",
        "route \"c\": blob_redirects: use 'pass', 'follow' or 'store'",
        'route "c": cache must be true or false',
    ]


def test_upstream_is_required(tmp_path: Path) -> None:
    assert errors_of(tmp_path, '[[routes]]\nname = "a"\n') == [
        'route "a": upstream is required (a URL, a host name or a known name: docker.io, ...)'
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no routes: give at least one [[routes]] table"),
        ('routes = "x"', "routes must be [[routes]] tables"),
        ("[routes]\nname = 'a'", "routes must be [[routes]] tables"),
    ],
)
def test_a_file_without_route_tables_is_refused(tmp_path: Path, text: str, message: str) -> None:
    assert errors_of(tmp_path, text) == [message]


def test_wrong_types_are_named(tmp_path: Path) -> None:
    assert errors_of(
        tmp_path,
        """
        [[routes]]
        name = "a"
        upstream = 5
        allow = "library/*"
        google_adc = 1
        """,
    ) == [
        'route "a": upstream must be a string',
        'route "a": allow must be a list',
        'route "a": google_adc must be true or false',
    ]


def test_an_empty_allow_list_is_a_mistake(tmp_path: Path) -> None:
    assert errors_of(tmp_path, '[[routes]]\nname = "a"\nupstream = "quay.io"\nallow = []\n') == [
        'route "a": allow: list at least one pattern, or leave allow out'
    ]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            'username = "u"\npassword_file = "pw"\nauth_header_file = "hdr"',
            "choose one kind of credentials, not username + password_file and auth_header_file",
        ),
        (
            'auth_header_file = "hdr"\ngoogle_adc = true',
            "choose one kind of credentials, not auth_header_file and google_adc",
        ),
        (
            'google_credentials = "key.json"\ngoogle_adc = true',
            "choose one kind of credentials, not google_credentials and google_adc",
        ),
        ('username = "u"', "username and password_file go together"),
        ('password_file = "pw"', "username and password_file go together"),
        ("google_json_key = true", "google_json_key needs google_credentials"),
    ],
)
def test_credential_kinds_are_exclusive(tmp_path: Path, keys: str, message: str) -> None:
    for name, content in (("pw", "p"), ("hdr", "Basic eA=="), ("key.json", "{}")):
        (tmp_path / name).write_text(content)
    text = f'[[routes]]\nname = "a"\nupstream = "quay.io"\n{keys}\n'
    assert errors_of(tmp_path, text) == [f'route "a": {message}']


def test_credential_mistakes_are_all_reported(tmp_path: Path) -> None:
    """One mistake of how credential keys go together hides neither another nor a
    missing secret file (a misspelt username made password_file's absence invisible)."""
    (tmp_path / "key.json").write_text("{}")
    text = (
        '[[routes]]\nname = "a"\nupstream = "quay.io"\nusename = "u"\n'
        'password_file = "missing"\ngoogle_credentials = "key.json"\n'
    )
    assert errors_of(tmp_path, text) == [
        'route "a": unknown key "usename" (did you mean "username"?)',
        f'route "a": password_file: cannot read "{tmp_path}/missing": No such file or directory',
        'route "a": choose one kind of credentials, not username + password_file and '
        "google_credentials",
        'route "a": username and password_file go together',
    ]


@pytest.mark.parametrize(
    ("keys", "credentials"),
    [
        (
            'username = "bot"\npassword_file = "pw"',
            Credentials(username="bot", password="p4ss"),
        ),
        ('auth_header_file = "hdr"', Credentials(auth_header="Basic eA==")),
        ("google_adc = true", Credentials(google_adc=True)),
        ('google_credentials = "key.json"', Credentials(google_key_file="KEY")),
        (
            'google_credentials = "key.json"\ngoogle_json_key = true',
            Credentials(google_key_file="KEY", google_json_key=True),
        ),
    ],
)
def test_each_credential_kind(tmp_path: Path, keys: str, credentials: Credentials) -> None:
    for name, content in (("pw", "p4ss\n"), ("hdr", "Basic eA==\n"), ("key.json", "{}")):
        (tmp_path / name).write_text(content)
    text = f'[[routes]]\nname = "a"\nupstream = "quay.io"\n{keys}\n'
    (route,) = load_routes(write(tmp_path, text)).routes
    if credentials.google_key_file:
        credentials = Credentials(
            google_key_file=str(tmp_path / "key.json"),
            google_json_key=credentials.google_json_key,
        )
    assert route.credentials == credentials
    assert route.credentials.configured


def test_secret_file_errors_name_the_key_and_never_the_content(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe-hunter2")
    errors = errors_of(
        tmp_path,
        """
        [[routes]]
        name = "a"
        upstream = "quay.io"
        path = "a"
        username = "u"
        password_file = "missing"
        [[routes]]
        name = "b"
        upstream = "quay.io"
        path = "b"
        auth_header_file = "empty"
        [[routes]]
        name = "c"
        upstream = "quay.io"
        path = "c"
        auth_header_file = "binary"
        [[routes]]
        name = "d"
        upstream = "quay.io"
        google_credentials = "missing.json"
        upstream_ca = "/nonexistent/ca.pem"
        """,
    )
    assert errors == [
        f'route "a": password_file: cannot read "{tmp_path}/missing": No such file or directory',
        f'route "b": auth_header_file: "{tmp_path}/empty" is empty',
        f'route "c": auth_header_file: "{tmp_path}/binary" is not UTF-8 text',
        "route \"d\": upstream_ca: '/nonexistent/ca.pem' is not a readable file",
        f"route \"d\": google_credentials: '{tmp_path}/missing.json' is not a readable file",
    ]
    assert not any("hunter2" in error for error in errors)


def test_secrets_stay_out_of_repr(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("hunter2")
    (tmp_path / "hdr").write_text("Bearer hunter3")
    text = """
        [[routes]]
        name = "a"
        upstream = "quay.io"
        path = "a"
        username = "bot"
        password_file = "pw"
        [[routes]]
        name = "b"
        upstream = "quay.io"
        auth_header_file = "hdr"
        """
    table = load_routes(write(tmp_path, text))
    assert "hunter" not in repr(table)


def test_relative_files_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "pw").write_text("p")
    path = write(
        tmp_path / "etc",
        '[[routes]]\nname = "a"\nupstream = "quay.io"\nusername = "u"\npassword_file = "pw"\n',
    )
    monkeypatch.chdir("/")
    (route,) = load_routes(path).routes
    assert route.credentials.password == "p"


def test_a_missing_config_file(tmp_path: Path) -> None:
    # The caller names the file (--check, a reload's log line): the error does not again.
    assert check_config(tmp_path / "nope.toml") == [
        "cannot read the file: No such file or directory"
    ]


def test_invalid_toml_names_the_place_and_leaves_the_file_to_the_caller(tmp_path: Path) -> None:
    path = write(tmp_path, '[[routes]]\nname = "a\n')
    (error,) = check_config(path)
    assert error.startswith("not valid TOML: ")
    assert "line 2" in error and str(path) not in error


def test_load_raises_config_error_with_all_errors(tmp_path: Path) -> None:
    path = write(tmp_path, '[[routes]]\nname = "a"\n[[routes]]\nname = "b"\n')
    with pytest.raises(ConfigError) as caught:
        load_routes(path)
    assert len(caught.value.errors) == 2
    assert str(caught.value) == "\n".join(caught.value.errors)


def test_a_valid_file_checks_clean(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("pw")
    assert check_config(write(tmp_path, README_EXAMPLE)) == []


# Ambiguity: each message names both routes.


def test_duplicate_names(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        [[routes]]
        name = "a"
        upstream = "quay.io"
        path = "x"
        [[routes]]
        name = "a"
        upstream = "quay.io"
        path = "y"
        """,
    )
    assert errors == ['routes #1 and #2 are both named "a"']


def test_duplicate_names_are_found_even_when_a_route_is_wrong(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        [[routes]]
        name = "a"
        upstream = "quay.io"
        [[routes]]
        name = "a"
        upstream = "ftp://quay.io"
        path = "y"
        """,
    )
    assert errors[0] == 'routes #1 and #2 are both named "a"'


@pytest.mark.parametrize(
    ("key", "first", "second", "message"),
    [
        ("host", "r.example.com", "R.example.com", 'both have host = "r.example.com"'),
        ("host", "*.example.com", "*.example.com", 'both have host = "*.example.com"'),
        ("path", "hub", "hub", 'both have path = "hub"'),
        ("namespace", "docker.io", "DOCKER.IO", 'both have namespace = "docker.io"'),
    ],
)
def test_two_routes_for_one_selector(
    tmp_path: Path, key: str, first: str, second: str, message: str
) -> None:
    errors = errors_of(
        tmp_path,
        f"""
        [[routes]]
        name = "one"
        upstream = "quay.io"
        {key} = "{first}"
        [[routes]]
        name = "two"
        upstream = "ghcr.io"
        {key} = "{second}"
        """,
    )
    assert errors == [f'routes "one" and "two" {message}']


def test_two_default_routes(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        [[routes]]
        name = "one"
        upstream = "quay.io"
        [[routes]]
        name = "two"
        upstream = "ghcr.io"
        [[routes]]
        name = "three"
        upstream = "gcr.io"
        """,
    )
    assert errors == [
        'routes "one" and "two" are both default routes (neither has host, path nor '
        "namespace): give one of them a selector",
        'routes "one" and "three" are both default routes (neither has host, path nor '
        "namespace): give one of them a selector",
    ]


def test_conflicts_are_reported_beside_route_errors(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        [[routes]]
        name = "one"
        upstream = "quay.io"
        path = "p"
        [[routes]]
        name = "bad"
        upstream = "quay.io"
        cache = "no"
        [[routes]]
        name = "two"
        upstream = "ghcr.io"
        path = "p"
        """,
    )
    assert errors == [
        'route "bad": cache must be true or false',
        'routes "one" and "two" both have path = "p"',
    ]


def test_a_wildcard_and_an_exact_host_are_not_ambiguous(tmp_path: Path) -> None:
    text = """
        [[routes]]
        name = "one"
        upstream = "quay.io"
        host = "*.example.com"
        [[routes]]
        name = "two"
        upstream = "ghcr.io"
        host = "ghcr.example.com"
        """
    assert errors_of(tmp_path, text) == []


def test_the_table_itself_refuses_conflicts() -> None:
    with pytest.raises(ConfigError) as caught:
        RouteTable((Route(Upstream("https", "a"), name="x"), Route(Upstream("https", "b"))))
    assert caught.value.errors == [
        'routes "x" and "default" are both default routes (neither has host, path nor '
        "namespace): give one of them a selector"
    ]


def test_config_default_route_is_the_route_without_selectors() -> None:
    path_route = Route(Upstream("https", "ghcr.io"), name="ghcr", path="ghcr")
    default = Route(Upstream("https", "quay.io"), name="quay")
    assert Config(routes=(path_route, default)).default_route == default
    # Without a default route, the first one, as before routes had selectors.
    assert Config(routes=(path_route,)).default_route == path_route


def flag_error(option: str, value: str, tmp_path: Path) -> str | None:
    """What ``--option value`` says of the value, or None when it takes it."""
    from twisted.python import usage

    from regproxy.tap import Options

    args = ["--upstream", "quay.io"] if option != "--upstream" else []
    try:
        Options(environ={}).parseOptions([*args, option, value])
    except usage.UsageError as error:
        return str(error).removeprefix("Parameter type enforcement failed: ")
    return None


def file_error(key: str, value: str, tmp_path: Path) -> str | None:
    """What a routes file says of ``key = value``, or None when it takes it."""
    upstream = "" if key == "upstream" else 'upstream = "quay.io"\n'
    text = f'[[routes]]\nname = "a"\n{upstream}{key} = {json.dumps(value)}\n'
    errors = errors_of(tmp_path, text)
    assert len(errors) <= 1, errors
    return errors[0].removeprefix('route "a": ') if errors else None


@pytest.mark.parametrize(
    ("option", "key", "value"),
    [
        ("--upstream", "upstream", "not a url"),
        ("--upstream", "upstream", "https://under_score.example.com:5000"),
        ("--upstream", "upstream", "https://bad host"),
        ("--upstream", "upstream", "ftp://quay.io"),
        ("--upstream", "upstream", "https://quay.io/v2/"),
        ("--upstream", "upstream", "https://user:pw@quay.io"),
        ("--upstream", "upstream", "https://quay.io:99999"),
        ("--upstream", "upstream", " http://127.0.0.1:5000 "),
        ("--repo-prefix", "repo_prefix", "UPPER"),
        ("--repo-prefix", "repo_prefix", " /proj/sub/ "),
        ("--blob-redirects", "blob_redirects", "Follow"),
        ("--blob-redirects", "blob_redirects", "sometimes"),
        ("--upstream-ca", "upstream_ca", "/nonexistent/ca.pem"),
    ],
)
def test_a_value_the_flag_refuses_the_file_refuses_in_the_same_words(
    option: str, key: str, value: str, tmp_path: Path
) -> None:
    flag, file = flag_error(option, value, tmp_path), file_error(key, value, tmp_path)
    if flag is None:
        assert file is None
    else:
        assert flag.startswith(f"{option}: ")
        assert file == f"{key}: {flag.removeprefix(f'{option}: ')}"


def test_the_issue_s_upstream_is_refused_by_check(tmp_path: Path) -> None:
    assert errors_of(tmp_path, '[[routes]]\nname = "a"\nupstream = "not a url"\n') == [
        "route \"a\": upstream: 'not a url' is not a registry URL; give one such as https://gcr.io"
    ]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.ascii_letters + string.digits + ":/._-@ ?#[]", max_size=40))
def test_upstream_the_file_takes_exactly_what_the_flag_takes(text: str) -> None:
    """Known registry names aside (the file's shorthand, docker.io), the same function."""
    from regproxy import option_values

    try:
        flag: object = option_values.upstream_url(text)
    except ValueError as error:
        flag = str(error)
    if known_upstream(text):
        return
    errors: list[str] = []
    read = read_table(
        {"upstream": text}, {"upstream": ROUTE_KEYS["upstream"]}, base=".", errors=errors
    )
    assert read.get("upstream", errors[0].removeprefix("upstream: ") if errors else None) == flag


def test_an_unknown_key_hides_none_of_the_route_s_other_errors(tmp_path: Path) -> None:
    text = '[[routes]]\nname = "a"\ncolour = "blue"\nupstream = "not a url"\ncache = "yes"\n'
    assert errors_of(tmp_path, text) == [
        'route "a": unknown key "colour"',
        "route \"a\": upstream: 'not a url' is not a registry URL; give one such as https://gcr.io",
        'route "a": cache must be true or false',
    ]
