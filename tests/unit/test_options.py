"""``twist regproxy`` options: the whole parsed Config, flags over the original's env."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from twisted.python import usage

from regproxy import option_help
from regproxy.config import BlobRedirects, CacheConfig, Config, Credentials, Route, Upstream
from regproxy.tap import Options

HUB = Upstream("https", "registry-1.docker.io")


def parse(args: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    options = Options(environ=environ or {})
    options.parseOptions(args or [])
    return options.config()


def usage_error(args: list[str] | None = None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(usage.UsageError) as caught:
        parse(args, environ)
    return str(caught.value)


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "key.json"
    path.write_text('{"type": "service_account", "private_key": "KEYSECRET"}')
    return str(path)


@pytest.fixture
def password_file(tmp_path: Path) -> str:
    path = tmp_path / "password"
    path.write_text("pa55w0rd-SECRET\n")
    return str(path)


def test_defaults() -> None:
    assert parse() == Config(
        routes=(
            Route(
                upstream=HUB,
                prefix="",
                credentials=Credentials(),
                blob_redirects=BlobRedirects.PASS,
                upstream_ca=None,
            ),
        ),
        listen=("tcp:8080",),
        public_url=None,
        disable_browser_redirects=False,
        metrics_listen=None,
        shutdown_grace=30.0,
        drain_delay=0.0,
        trusted_proxies=(),
        upstream_timeout=30.0,
        idle_timeout=60.0,
    )
    assert parse().default_route.library_names


def test_original_environment(key_file: str) -> None:
    environ = {
        "PORT": "5000",
        "HOST": "127.0.0.1",
        "REGISTRY_HOST": "GCR.io",
        "REPO_PREFIX": "/my-project/mirror/",
        "GOOGLE_APPLICATION_CREDENTIALS": key_file,
        "DISABLE_BROWSER_REDIRECTS": "1",
    }
    assert parse(environ=environ) == Config(
        routes=(
            Route(
                upstream=Upstream("https", "gcr.io"),
                prefix="my-project/mirror",
                credentials=Credentials(google_key_file=key_file),
            ),
        ),
        listen=("tcp:5000:interface=127.0.0.1",),
        disable_browser_redirects=True,
    )


def test_auth_header_from_environment() -> None:
    config = parse(environ={"REGISTRY_HOST": "http://127.0.0.1:5000", "AUTH_HEADER": "Basic eA=="})
    assert config == Config(
        routes=(
            Route(
                upstream=Upstream("http", "127.0.0.1:5000"),
                credentials=Credentials(auth_header="Basic eA=="),
            ),
        ),
    )


def test_tls_from_environment() -> None:
    config = parse(
        environ={"PORT": "8443", "TLS_CERT": "/tls/c:rt.pem", "TLS_KEY": "/tls/key.pem"}
    )
    assert config.listen == (r"ssl:8443:privateKey=/tls/key.pem:certKey=/tls/c\:rt.pem",)


def test_ipv6_host_is_escaped() -> None:
    assert parse(environ={"PORT": "80", "HOST": "::"}).listen == (r"tcp:80:interface=\:\:",)


def test_new_environment_variables(password_file: str) -> None:
    config = parse(
        environ={
            "REGPROXY_UPSTREAM_USERNAME": "robot",
            "REGPROXY_UPSTREAM_PASSWORD_FILE": password_file,
            "REGPROXY_PUBLIC_URL": "https://r.example.com/",
        }
    )
    assert config == Config(
        routes=(
            Route(
                upstream=HUB,
                credentials=Credentials(username="robot", password="pa55w0rd-SECRET"),
            ),
        ),
        public_url="https://r.example.com",
    )


def test_empty_environment_values_are_unset() -> None:
    environ = {"REGISTRY_HOST": "", "REPO_PREFIX": "", "AUTH_HEADER": "", "HOST": ""}
    environ["DISABLE_BROWSER_REDIRECTS"] = ""
    assert parse(environ=environ) == parse()


def test_flags_override_environment(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    environ = {
        "PORT": "5000",
        "HOST": "10.0.0.1",
        "REGISTRY_HOST": "gcr.io",
        "REPO_PREFIX": "env-prefix",
        "AUTH_HEADER": "Bearer env",
        "REGPROXY_PUBLIC_URL": "https://env.example",
    }
    args = [
        "--upstream=http://reg.example:5000",
        "--repo-prefix=flag/prefix",
        "--auth-header=Bearer flag",
        "--public-url=https://flag.example:8443",
        "--port=tcp:9000",
        "-p",
        "ssl:9443:privateKey=k.pem",
        "--blob-redirects=FOLLOW",
        "--upstream-ca",
        str(ca),
        "--metrics-port=tcp:9100:interface=127.0.0.1",
        "--shutdown-grace=0",
        "--upstream-timeout=2.5",
        "--idle-timeout=7",
        "--trusted-proxy=10.0.0.0/8",
        "--trusted-proxy=fd00::1",
        "--disable-browser-redirects",
    ]
    assert parse(args, environ) == Config(
        routes=(
            Route(
                upstream=Upstream("http", "reg.example:5000"),
                prefix="flag/prefix",
                credentials=Credentials(auth_header="Bearer flag"),
                blob_redirects=BlobRedirects.FOLLOW,
                upstream_ca=str(ca),
            ),
        ),
        listen=("tcp:9000", "ssl:9443:privateKey=k.pem"),
        public_url="https://flag.example:8443",
        disable_browser_redirects=True,
        metrics_listen="tcp:9100:interface=127.0.0.1",
        shutdown_grace=0.0,
        trusted_proxies=("10.0.0.0/8", "fd00::1/128"),
        upstream_timeout=2.5,
        idle_timeout=7.0,
    )


def test_google_flags(key_file: str) -> None:
    config = parse(["--google-credentials", key_file, "--google-json-key"])
    assert config.default_route.credentials == Credentials(
        google_key_file=key_file, google_json_key=True
    )
    assert parse(["--google-adc"]).default_route.credentials == Credentials(google_adc=True)


def test_repr_has_no_secrets(password_file: str) -> None:
    with_header = parse(environ={"AUTH_HEADER": "Bearer HEADERSECRET"})
    assert with_header.default_route.credentials.auth_header == "Bearer HEADERSECRET"
    with_password = parse(
        ["--upstream-username", "robot", "--upstream-password-file", password_file]
    )
    assert with_password.default_route.credentials.password == "pa55w0rd-SECRET"
    for config in (with_header, with_password):
        text = repr(config) + str(config)
        assert "HEADERSECRET" not in text
        assert "pa55w0rd" not in text
        assert "robot" in repr(with_password)  # the username is no secret
        assert "secret" not in repr(config.default_route.credentials).lower()


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"REGISTRY_HOST": "ftp://gcr.io"}, "REGISTRY_HOST"),
        ({"REGISTRY_HOST": "https://gcr.io/path"}, "REGISTRY_HOST"),
        ({"REGISTRY_HOST": "https://user:pw@gcr.io"}, "REGISTRY_HOST"),
        ({"REGISTRY_HOST": "https://gcr.io:http"}, "REGISTRY_HOST"),
        ({"REPO_PREFIX": "Bad/Prefix"}, "REPO_PREFIX"),
        (
            {"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/key.json", "REGISTRY_HOST": "gcr.io"},
            "GOOGLE_APPLICATION_CREDENTIALS",
        ),
        ({"REGPROXY_PUBLIC_URL": "r.example.com"}, "REGPROXY_PUBLIC_URL"),
        ({"PORT": "http"}, "PORT"),
        ({"PORT": "0"}, "PORT"),
        ({"PORT": "65536"}, "PORT"),
        ({"TLS_CERT": "/c.pem"}, "TLS_"),
        ({"TLS_KEY": "/k.pem"}, "TLS_"),
    ],
)
def test_invalid_environment_names_the_variable(environ: dict[str, str], variable: str) -> None:
    assert variable in usage_error(environ=environ)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--trusted-proxy", "not-a-network"], "--trusted-proxy"),
        (["--upstream-username", "robot"], "--upstream-password-file"),
        (["--google-json-key"], "--google-credentials"),
        (["--auth-header", "x", "--google-adc"], "--auth-header"),
    ],
)
def test_invalid_cross_field_flags_name_the_option(args: list[str], option: str) -> None:
    assert option in usage_error(args)


def test_username_and_password_file_go_together(password_file: str) -> None:
    assert "--upstream-username" in usage_error(["--upstream-password-file", password_file])


@pytest.mark.parametrize(
    "args",
    [
        ["--upstream", "ftp://gcr.io"],
        ["--upstream", "https://gcr.io/v2/"],
        ["--repo-prefix", "UPPER"],
        ["--blob-redirects", "sometimes"],
        ["--shutdown-grace", "-1"],
        ["--shutdown-grace", "soon"],
        ["--upstream-timeout", "0"],
        ["--idle-timeout", "inf"],
        ["--google-credentials", "/nonexistent/key.json"],
        ["--upstream-ca", "/nonexistent/ca.pem"],
        ["--public-url", "https://r.example.com/path"],
    ],
)
def test_invalid_values_raise_usage_error(args: list[str]) -> None:
    assert usage_error(args)


@pytest.mark.parametrize(
    "args",
    [
        ["--upstream", "ftp://gcr.io"],
        ["--repo-prefix", "UPPER"],
        ["--blob-redirects", "sometimes"],
        ["--shutdown-grace", "-1"],
        ["--google-credentials", "/nonexistent/key.json"],
    ],
)
def test_invalid_flag_values_name_the_option(args: list[str]) -> None:
    message = usage_error(args)
    assert f"{args[0]}: " in message, message


def test_google_adc_leaves_the_key_file_variable_to_google_auth(tmp_path) -> None:
    key = tmp_path / "key.json"
    key.write_text("{}")
    options = Options(environ={"GOOGLE_APPLICATION_CREDENTIALS": str(key)})
    options.parseOptions(["--google-adc"])
    credentials = options.config().default_route.credentials
    assert credentials.google_adc is True
    assert credentials.google_key_file is None


def test_a_bare_port_number_means_tcp() -> None:
    config = parse(["--port", "8084", "--metrics-port", "9090"])
    assert (config.listen, config.metrics_listen) == (("tcp:8084",), "tcp:9090")


@pytest.mark.parametrize("args", [["--port", "0"], ["--port", "70000"], ["--port", ""]])
def test_impossible_ports_name_the_option(args: list[str]) -> None:
    assert usage_error(args).startswith("--port: ")


@pytest.mark.parametrize("url", ["not a url", "https://exa mple.com", "http://[bad", "a/b"])
def test_upstream_that_is_no_url_is_refused(url: str) -> None:
    assert "--upstream" in usage_error(["--upstream", url])


def test_drain_delay() -> None:
    assert parse(["--drain-delay", "5"]).drain_delay == 5.0
    assert "--drain-delay" in usage_error(["--drain-delay", "-1"])


def options(args: list[str], environ: dict[str, str]) -> Options:
    parsed = Options(environ=environ)
    parsed.parseOptions(args)
    return parsed


@pytest.mark.parametrize(
    "upstream",
    ["https://registry-1.docker.io", "https://ghcr.io", "http://127.0.0.1:5000", "gcr.io.evil"],
)
def test_ambient_google_credentials_are_ignored_for_other_upstreams(
    upstream: str, key_file: str
) -> None:
    parsed = options(["--upstream", upstream], {"GOOGLE_APPLICATION_CREDENTIALS": key_file})
    assert parsed.config().default_route.credentials == Credentials()
    assert len(parsed.warnings) == 1
    assert "GOOGLE_APPLICATION_CREDENTIALS is ignored" in parsed.warnings[0]
    assert "not a Google registry" in parsed.warnings[0]


@pytest.mark.parametrize(
    "upstream", ["https://gcr.io", "eu.gcr.io", "https://europe-docker.pkg.dev"]
)
def test_ambient_google_credentials_serve_google_upstreams(upstream: str, key_file: str) -> None:
    parsed = options(["--upstream", upstream], {"GOOGLE_APPLICATION_CREDENTIALS": key_file})
    assert parsed.config().default_route.credentials.google_key_file == key_file
    assert parsed.warnings == []


def test_ambient_google_credentials_do_not_block_a_username(
    key_file: str, password_file: str
) -> None:
    parsed = options(
        [
            "--upstream",
            "https://gcr.io",
            "--upstream-username",
            "robot",
            "--upstream-password-file",
            password_file,
        ],
        {"GOOGLE_APPLICATION_CREDENTIALS": key_file},
    )
    credentials = parsed.config().default_route.credentials
    assert (credentials.username, credentials.google_key_file) == ("robot", None)
    assert "another upstream credential" in parsed.warnings[0]


def test_explicit_google_credentials_go_anywhere_they_are_told(key_file: str) -> None:
    parsed = options(["--upstream", "https://ghcr.io", "--google-credentials", key_file], {})
    assert parsed.config().default_route.credentials.google_key_file == key_file


def test_log_format_option_and_environment() -> None:
    from regproxy.server.logs import LogFormat

    assert options([], {})["log-format"] is None
    assert options(["--log-format", "JSON"], {})["log-format"] is LogFormat.JSON
    assert options([], {"REGPROXY_LOG_FORMAT": "text"})["log-format"] is LogFormat.TEXT
    assert "--log-format" in usage_error(["--log-format", "xml"])


def test_usage_errors_outside_twist_stay_exceptions() -> None:
    """Only under twist (a parent) does a usage error end the process; see test_cli."""
    assert "--bogus" in usage_error(["--bogus"])


def test_credentials_directory_with_both_files(tmp_path: Path) -> None:
    (tmp_path / "username").write_text("robot\n")
    (tmp_path / "password").write_text("pa55w0rd-SECRET\n")
    credentials = parse(
        [], {"REGPROXY_UPSTREAM_CREDENTIALS_DIR": str(tmp_path)}
    ).default_route.credentials
    assert (credentials.username, credentials.password) == ("robot", "pa55w0rd-SECRET")


def test_an_empty_credentials_directory_means_no_credentials(tmp_path: Path) -> None:
    """A Kubernetes Secret volume that is optional and absent: the pods still start."""
    config = parse(["--upstream-credentials-dir", str(tmp_path)])
    assert config.default_route.credentials == Credentials()


@pytest.mark.parametrize(
    ("present", "missing"), [("username", "password"), ("password", "username")]
)
def test_a_half_filled_credentials_directory_says_what_is_missing(
    tmp_path: Path, present: str, missing: str
) -> None:
    (tmp_path / present).write_text("x")
    message = usage_error(["--upstream-credentials-dir", str(tmp_path)])
    assert message.startswith("--upstream-credentials-dir: ")
    assert repr(missing) in message


def test_credentials_directory_must_exist() -> None:
    assert "--upstream-credentials-dir" in usage_error(
        ["--upstream-credentials-dir", "/nonexistent/dir"]
    )


def test_cache_defaults(tmp_path: Path) -> None:
    config = parse(["--cache-dir", str(tmp_path), "--cache-max-size", "10G"])
    assert config == Config(
        routes=(Route(upstream=HUB),),
        cache=CacheConfig(
            directory=str(tmp_path),
            max_size=10 * 1024**3,
            stale_max_age=7 * 86400.0,
            tag_ttl=0.0,
            verify=False,
            scrub_interval=86400.0,
            public_ttl=600.0,
            abandoned_limit=1024**3,
        ),
    )


def test_every_cache_option(tmp_path: Path) -> None:
    args = ["--cache-max-size", "500M", "--cache-stale-max-age", "60", "--cache-tag-ttl", "5"]
    args += ["--cache-verify", "--cache-scrub-interval", "3600", "--cache-public-ttl", "30"]
    args += ["--cache-abandoned-limit", "256M"]
    config = parse(args, {"REGPROXY_CACHE_DIR": str(tmp_path)})
    assert config == Config(
        routes=(Route(upstream=HUB),),
        cache=CacheConfig(
            directory=str(tmp_path),
            max_size=500 * 1024**2,
            stale_max_age=60.0,
            tag_ttl=5.0,
            verify=True,
            scrub_interval=3600.0,
            public_ttl=30.0,
            abandoned_limit=256 * 1024**2,
        ),
    )


def test_zero_turns_the_scrub_and_abandoned_downloads_off(tmp_path: Path) -> None:
    args = ["--cache-dir", str(tmp_path), "--cache-scrub-interval", "0"]
    cache = parse([*args, "--cache-public-ttl", "0", "--cache-abandoned-limit", "0"]).cache
    assert cache is not None
    assert (cache.scrub_interval, cache.public_ttl, cache.abandoned_limit) == (0.0, 0.0, 0)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--cache-scrub-interval", "-1"),
        ("--cache-scrub-interval", "daily"),
        ("--cache-public-ttl", "inf"),
        ("--cache-abandoned-limit", "lots"),
        ("--cache-abandoned-limit", "-1G"),
    ],
)
def test_bad_cache_values_name_their_option(tmp_path: Path, option: str, value: str) -> None:
    assert option in usage_error(["--cache-dir", str(tmp_path), option, value])


# --- --help ---------------------------------------------------------------------------

# Options other parts of regproxy add (issues 18 and 19): placed in the table beforehand.
ANNOUNCED = {"htpasswd", "insecure-auth", "cache-store"}


def help_text(width: int = 80) -> str:
    return str(Options(environ={}).getUsage(width=width))


def shown_options(text: str) -> dict[str, list[str]]:
    """The long options the help shows under each heading, in order."""
    found: dict[str, list[str]] = {}
    heading = None
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            heading = line[:-1]
            found[heading] = []
        elif heading is not None and (match := re.match(r" {2}(?:-\w, | {4})--([\w-]+)", line)):
            found[heading].append(match.group(1))
    return found


def test_every_option_has_a_group() -> None:
    """A new option must be placed under a heading, or the help would leave it out."""
    assert option_help.ungrouped(Options(environ={})) == []


def test_an_option_without_a_group_is_reported() -> None:
    class More(Options):
        optParameters = [*Options.optParameters, ["brand-new", None, None, "New."]]

    assert option_help.ungrouped(More(environ={})) == ["brand-new"]


def test_the_group_table_names_only_options() -> None:
    names = option_help.option_names(Options(environ={}))
    listed = {name for group in option_help.GROUPS for name, _ in group.entries()}
    assert listed - set(names) <= ANNOUNCED


def test_parameters_have_a_metavar_and_flags_have_none() -> None:
    names = option_help.option_names(Options(environ={}))
    for group in option_help.GROUPS:
        for name, metavar in group.entries():
            if name in names:
                assert (metavar is not None) == names[name], name


def test_help_shows_the_groups_in_order_each_option_once() -> None:
    names = option_help.option_names(Options(environ={}))
    expected = {
        group.heading: [name for name, _ in group.entries() if name in names]
        for group in option_help.GROUPS
    }
    assert shown_options(help_text()) == {h: shown for h, shown in expected.items() if shown}
    assert list(expected) == [
        "Listeners",
        "Upstream",
        "Credentials",
        "Routes",
        "Cache",
        "Access",
        "Operations",
    ]


def test_help_has_regprox_own_usage_line_under_twist() -> None:
    class Twist(usage.Options):
        subCommands = [["regproxy", None, Options, "regproxy"]]

    parent = Twist()
    options = Options(environ={})
    options.parent, parent.subCommand = parent, "regproxy"
    assert str(options).startswith("Usage: twist regproxy [options]\n\n")
    assert "plugin" not in str(options).splitlines()[0]


def test_internal_options_are_hidden_but_accepted() -> None:
    assert "as-worker" not in help_text()
    assert "as-worker" in option_help.option_names(Options(environ={}))


def test_each_help_is_one_sentence_ending_once() -> None:
    options = Options(environ={})
    shown = {name for names in shown_options(help_text()).values() for name in names}
    for name in shown:
        sentence = option_help.help_sentence(options, name)
        assert sentence[:1].isupper(), (name, sentence)
        assert sentence.endswith(".") and not sentence.endswith(".."), (name, sentence)
        # No sentence ends inside: no ". ", "? " or "! " before the last character.
        assert re.search(r"[.!?]\s", sentence[:-1]) is None, (name, sentence)
    assert re.findall(r"[^.]\.\.(?!\.)", help_text()) == []


def test_help_says_each_default() -> None:
    options = Options(environ={})
    takes_value = option_help.option_names(options)
    for name, default in options.defaults.items():
        if takes_value[name] and default is not None:
            assert "default" in option_help.help_sentence(options, name), name


def test_idle_timeout_help_names_the_request_deadline() -> None:
    sentence = option_help.help_sentence(Options(environ={}), "idle-timeout")
    assert "headers" in sentence and "408" in sentence


@pytest.mark.parametrize("width", [60, 80, 120])
def test_help_fits_the_terminal(width: int) -> None:
    lines = help_text(width).splitlines()
    assert max(len(line) for line in lines) <= width
    # Wrapped at spaces only: option names and URLs in the help hold hyphens.
    assert [line for line in lines if re.search(r"\w-$", line)] == []
    # The help of every option starts in one column, on the option's line or below it.
    starts = {
        len(match.group(1))
        for line in lines
        if (match := re.match(r"( {2}(?:-\w, | {4})--\S+ +)\S", line))
    }
    assert len(starts) == 1
