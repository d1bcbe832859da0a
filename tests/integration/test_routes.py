"""Many upstreams behind one proxy, with real registries and real clients.

Two distribution registries at once: one with token auth over TLS (its token service on
TLS too), one anonymous over plain HTTP. One routes file serves them through path routes,
a host route (``localhost`` against ``127.0.0.1``), a containerd namespace route and a
default route with an allow-list; skopeo and containerd pull through each with digest
checks; SIGHUP reloads while a blob download goes on.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import Containerd
from tests.support.curl import curl
from tests.support.images import sha256_digest, skopeo_copy, skopeo_list_tags
from tests.support.ports import free_port
from tests.support.registry import RegistryServer
from tests.support.seed import SeededRegistry, StandardImages, seed_registry
from tests.support.tls import TLSFiles
from tests.support.tokens import TokenIssuer
from tests.support.tools import require_programs
from tests.support.waiting import eventually


@pytest.fixture(scope="module")
def tls_token_issuer(
    tmp_path_factory: pytest.TempPathFactory,
    tls_files: TLSFiles,
    proxy_credentials: tuple[str, str],
):
    user, password = proxy_credentials
    with TokenIssuer(
        tmp_path_factory.mktemp("issuer-tls"),
        users={user: password},
        service="secure-registry",
        tls=tls_files,
    ) as issuer:
        yield issuer


@pytest.fixture(scope="module")
def secure(
    tmp_path_factory: pytest.TempPathFactory,
    tls_files: TLSFiles,
    tls_token_issuer: TokenIssuer,
    standard_images: StandardImages,
    proxy_credentials: tuple[str, str],
) -> Iterator[SeededRegistry]:
    """Token auth over TLS (anonymous pulls allowed); the standard images under ``mirror/``."""
    with RegistryServer(
        auth="token",
        token_issuer=tls_token_issuer,
        tls=tls_files,
        directory=tmp_path_factory.mktemp("registry-secure"),
    ) as server:
        seeded = seed_registry(server, standard_images, creds=proxy_credentials, prefix="mirror")
        tls_token_issuer.clear()
        yield seeded


@pytest.fixture(scope="module")
def plain(registry: RegistryServer, standard_images: StandardImages) -> SeededRegistry:
    """The anonymous plain registry, with the standard images at the top and under library/."""
    seed_registry(registry, standard_images, prefix="library")
    return seed_registry(registry, standard_images)


def routes_toml(secure: SeededRegistry, plain: SeededRegistry, tls_files: TLSFiles) -> str:
    return f"""
[[routes]]
name = "sec"
upstream = "{secure.url}"
repo_prefix = "mirror"
path = "sec"
upstream_ca = "{tls_files.ca_cert}"
allow = ["app", "team/**", "multi", "big", "many"]

[[routes]]
name = "plain"
upstream = "{plain.url}"
path = "plain"

[[routes]]
name = "byhost"
upstream = "{secure.url}"
repo_prefix = "mirror"
host = "localhost"
upstream_ca = "{tls_files.ca_cert}"

[[routes]]
name = "hub"
upstream = "{plain.url}"
namespace = "docker.io"

[[routes]]
name = "top"
upstream = "{plain.url}"
allow = ["app", "team/**", "big"]
"""


@pytest.fixture
def config(tmp: Path, secure, plain, tls_files: TLSFiles) -> Path:
    path = tmp / "routes.toml"
    path.write_text(routes_toml(secure, plain, tls_files))
    return path


@pytest.fixture
def proxy(start_proxy, config: Path):
    return start_proxy(["--config", str(config)])


@pytest.mark.parametrize("ref", ["app:v1", "team/app:v1", "multi:v1", "big:v1"])
def test_skopeo_pulls_through_every_route(
    proxy, secure: SeededRegistry, plain: SeededRegistry, tmp: Path, ref: str
) -> None:
    name, _, tag = ref.partition(":")
    key = ref
    pulls = {
        f"{proxy.host_port}/sec/{ref}": secure[key],
        f"{proxy.host_port}/plain/{ref}": plain[key],
        f"localhost:{proxy.port}/{ref}": secure[key],
    }
    if name != "multi":  # the top route's allow-list: app, team/**, big
        pulls[f"{proxy.host_port}/{ref}"] = plain[key]
    for number, (source, digest) in enumerate(pulls.items()):
        extra = ["--all"] if name == "multi" else []
        result = skopeo_copy(source, tmp / f"out{number}", extra, tag=tag)
        assert result.digest == digest, source


def test_each_route_has_its_own_tls_trust_whatever_the_order(
    start_proxy, secure: SeededRegistry, plain: SeededRegistry, tls_files: TLSFiles, tmp: Path
) -> None:
    """The route that trusts the test CA is neither first nor last: a proxy that gave every
    route the first route's client (or any one route's) fails one of these."""
    path = tmp / "trust.toml"
    path.write_text(
        f"""
[[routes]]
name = "plain"
upstream = "{plain.url}"
path = "plain"

[[routes]]
name = "untrusted"
upstream = "{secure.url}"
repo_prefix = "mirror"
path = "untrusted"

[[routes]]
name = "sec"
upstream = "{secure.url}"
repo_prefix = "mirror"
path = "sec"
upstream_ca = "{tls_files.ca_cert}"

[[routes]]
name = "after"
upstream = "{secure.url}"
repo_prefix = "mirror"
path = "after"
"""
    )
    proxy = start_proxy(["--config", str(path)])
    result = skopeo_copy(f"{proxy.host_port}/sec/app:v1", tmp / "sec", tag="v1")
    assert result.digest == secure["app:v1"]
    assert (
        skopeo_copy(f"{proxy.host_port}/plain/app:v1", tmp / "plain", tag="v1").digest
        == (plain["app:v1"])
    )
    for name in ("untrusted", "after"):
        answer = curl(proxy.url + f"/v2/{name}/app/manifests/v1")
        assert answer.status == 502, (name, answer.status)
        assert answer.error_codes() == ["UPSTREAM_UNAVAILABLE"], name
    events = [e for e in proxy.log_events() if e.get("log_namespace") == "regproxy.access"]
    refused = {e.get("route") for e in events if e.get("error_kind") == "tls"}
    assert refused == {"untrusted", "after"}


def test_many_tags_are_listed_through_every_route(proxy, plain: SeededRegistry) -> None:
    for where in (f"{proxy.host_port}/sec", f"{proxy.host_port}/plain", f"localhost:{proxy.port}"):
        tags = skopeo_list_tags(f"docker://{where}/many")
        assert sorted(tags) == plain.many_tags, where


def test_the_allow_list_hides_repositories(proxy, tmp: Path) -> None:
    result = skopeo_copy(f"{proxy.host_port}/multi:v1", tmp / "denied", tag="v1", check=False)
    assert result.returncode != 0

    for method in ([], ["-I"]):
        answer = curl(proxy.url + "/v2/multi/manifests/v1", *method)
        assert answer.status == 404
    assert curl(proxy.url + "/v2/multi/tags/list").error_codes() == ["NAME_UNKNOWN"]


def test_token_scopes_outside_the_allow_list_never_reach_the_upstream(
    proxy, tls_token_issuer: TokenIssuer
) -> None:
    tls_token_issuer.clear()
    token = curl(
        proxy.url + "/_token?service=regproxy"
        "&scope=repository:sec/secret:pull&scope=repository:sec/app:pull"
    )
    assert token.status == 200
    assert tls_token_issuer.requested_scopes() == ["repository:mirror/app:pull"]


def test_tokens_go_to_the_routes_own_realm_with_its_prefix(
    proxy, tls_token_issuer: TokenIssuer, secure: SeededRegistry, tmp: Path
) -> None:
    tls_token_issuer.clear()
    skopeo_copy(f"{proxy.host_port}/sec/app:v1", tmp / "out", tag="v1")
    assert "repository:mirror/app:pull" in tls_token_issuer.requested_scopes()
    assert all("sec/" not in scope for scope in tls_token_issuer.requested_scopes())


def test_containerd_through_the_namespace_and_a_path_route(
    proxy, plain: SeededRegistry, standard_images: StandardImages, tmp: Path
) -> None:
    require_programs("containerd (Debian package containerd)", "ctr", what="containerd")
    (tmp / "containerd").mkdir()
    with Containerd(tmp / "containerd") as containerd:
        hosts = tmp / "hosts" / "docker.io"
        hosts.mkdir(parents=True)
        # The fallback server is a closed loopback port: nothing may reach the internet.
        (hosts / "hosts.toml").write_text(
            f'server = "http://127.0.0.1:{free_port()}"\n\n'
            f'[host."http://{proxy.host_port}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        digest = containerd.fetch(
            "docker.io/library/app:v1", "--hosts-dir", str(tmp / "hosts"), namespace="mirror"
        )
        assert digest == plain["app:v1"]
        digest = containerd.fetch(f"{proxy.host_port}/plain/team/app:v1", "--plain-http")
        assert digest == plain["team/app:v1"]
    events = [e for e in proxy.log_events() if e.get("log_namespace") == "regproxy.access"]
    assert any(e.get("route") == "hub" for e in events)


def test_sighup_adds_a_route_while_a_download_goes_on(
    proxy, config: Path, plain: SeededRegistry, standard_images: StandardImages
) -> None:
    big = standard_images.big.layers[0]
    with socket.create_connection(("127.0.0.1", proxy.port)) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.sendall(
            f"GET /v2/plain/big/blobs/{big.digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        received = client.recv(65536)
        assert received.startswith(b"HTTP/1.1 200")
        # Mid-download: a new route appears.
        config.write_text(
            config.read_text()
            + f'\n[[routes]]\nname = "late"\nupstream = "{plain.url}"\npath = "late"\n'
        )
        proxy.send_signal(signal.SIGHUP)

        eventually(lambda: curl(proxy.url + "/v2/late/app/tags/list").status == 200)
        # The old transfer finishes intact on the routing it started with.
        while len(received) < big.size + 200:
            chunk = client.recv(1 << 20)
            if not chunk:
                break
            received += chunk
            if b"\r\n\r\n" in received and len(received.partition(b"\r\n\r\n")[2]) >= big.size:
                break
    body = received.partition(b"\r\n\r\n")[2][: big.size]
    assert sha256_digest(body) == big.digest


def test_an_invalid_reload_keeps_the_routes(proxy, config: Path) -> None:

    config.write_text(config.read_text() + '\n[[routes]]\nname = "top"\nupstream = "x"\n')
    proxy.send_signal(signal.SIGHUP)
    eventually(lambda: "reload of" in proxy.log_text())
    assert "refused" in proxy.log_text()
    assert curl(proxy.url + "/v2/plain/app/tags/list").status == 200


def test_check_validates_a_file(config: Path, tmp: Path) -> None:
    def check(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "twisted", "regproxy", "--config", str(path), "--check"],
            capture_output=True,
            text=True,
            timeout=60,
        )

    good = check(config)
    assert good.returncode == 0, good.stderr
    unknown_key = tmp / "unknown.toml"
    unknown_key.write_text('[[routes]]\nname = "a"\nupstream = "x"\nbogus = true\n')
    ambiguous = tmp / "ambiguous.toml"
    ambiguous.write_text(
        '[[routes]]\nname = "a"\nupstream = "x"\npath = "p"\n'
        '[[routes]]\nname = "b"\nupstream = "y"\npath = "p"\n'
    )
    for bad, words in ((unknown_key, ["bogus", '"a"']), (ambiguous, ['"a"', '"b"', "path"])):
        result = check(bad)
        assert result.returncode == 1
        output = result.stdout + result.stderr
        for word in words:
            assert word in output, (word, output)
        assert "Traceback" not in output
