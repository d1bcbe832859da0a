"""Access control with real clients: the proxy's own users (htpasswd), its token service and
rules, in front of a real registry. skopeo (--creds), podman (login + pull) and containerd
(ctr --user) each pull an allowed repository with its digests checked, and fail for a
repository the rules refuse and for a wrong password."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.containerd import Containerd
from tests.support.images import OCI_MANIFEST, push, skopeo_copy, verify_layout
from tests.support.podman import Podman
from tests.support.proxy import RegproxyProcess
from tests.support.registry import RegistryServer, write_htpasswd
from tests.support.seed import StandardImages
from tests.support.tools import require_programs
from tests.support.waiting import eventually

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}
ROUTES = """\
[auth]
htpasswd = "users.htpasswd"
token_key = "token-key.pem"
token_ttl = 120
groups = {{ b-team = ["bob"] }}

[[routes]]
name = "own"
upstream = "{upstream}"
  [[routes.access]]
  repos = ["public/**"]
  pull = ["anonymous"]
  [[routes.access]]
  repos = ["team-a/**"]
  pull = ["alice"]
  [[routes.access]]
  repos = ["team-b/**"]
  pull = ["@b-team"]
"""


@pytest.fixture(scope="module")
def images(registry: RegistryServer, standard_images: StandardImages) -> str:
    """team-a/app, team-b/app and public/app in the registry; the digest they share."""
    for name in ("team-a/app", "team-b/app", "public/app"):
        push(standard_images.layout, "app", f"{registry.host_port}/{name}:v1")
    return standard_images.app.digest


@pytest.fixture
def proxy(tmp_path: Path, start_proxy, registry: RegistryServer, images: str) -> RegproxyProcess:
    write_htpasswd(tmp_path / "users.htpasswd", USERS)
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "token-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    routes = tmp_path / "routes.toml"
    routes.write_text(ROUTES.format(upstream=registry.url))
    return start_proxy(["--config", str(routes)])


def access_events(proxy: RegproxyProcess) -> list[dict[str, object]]:
    return [e for e in proxy.log_events() if e.get("log_namespace") == "regproxy.access"]


# -- skopeo ------------------------------------------------------------------------------------


def test_skopeo_pulls_what_the_rules_admit(
    proxy: RegproxyProcess, images: str, tmp_path: Path
) -> None:
    copied = skopeo_copy(
        f"{proxy.host_port}/team-a/app:v1", tmp_path / "a", creds=("alice", USERS["alice"])
    )
    assert copied.digest == images
    verify_layout(tmp_path / "a")


def test_skopeo_is_refused_a_repository_the_rules_do_not_admit(
    proxy: RegproxyProcess, tmp_path: Path
) -> None:
    copied = skopeo_copy(
        f"{proxy.host_port}/team-b/app:v1",
        tmp_path / "b",
        creds=("alice", USERS["alice"]),
        check=False,
    )
    assert not copied.ok
    assert "denied: access to this repository is denied" in copied.stderr, copied.stderr


def test_skopeo_with_a_wrong_password_is_refused(proxy: RegproxyProcess, tmp_path: Path) -> None:
    copied = skopeo_copy(
        f"{proxy.host_port}/team-a/app:v1", tmp_path / "a", creds=("alice", "wrong"), check=False
    )
    assert not copied.ok
    assert "authentication failed" in copied.stderr, copied.stderr


def test_skopeo_anonymous_pulls_only_public(
    proxy: RegproxyProcess, images: str, tmp_path: Path
) -> None:
    assert skopeo_copy(f"{proxy.host_port}/public/app:v1", tmp_path / "p").digest == images
    refused = skopeo_copy(f"{proxy.host_port}/team-a/app:v1", tmp_path / "a", check=False)
    assert not refused.ok
    assert "unauthorized" in refused.stderr, refused.stderr


def test_the_access_log_names_the_user_and_never_a_secret(
    proxy: RegproxyProcess, tmp_path: Path
) -> None:
    skopeo_copy(f"{proxy.host_port}/team-b/app:v1", tmp_path / "b", creds=("bob", USERS["bob"]))
    skopeo_copy(
        f"{proxy.host_port}/team-b/app:v1", tmp_path / "x", creds=("bob", "Wr0ng-pw"), check=False
    )
    proxy.stop()
    users = {
        e.get("user") for e in access_events(proxy) if str(e["path"]).startswith("/v2/team-b")
    }
    assert "bob" in users
    log = proxy.log_text()
    assert USERS["bob"] not in log and "Wr0ng-pw" not in log and "eyJ" not in log


def test_v2_challenges_with_the_proxys_realm(proxy: RegproxyProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{proxy.url}/v2/", timeout=10)
    assert caught.value.code == 401
    assert caught.value.headers["www-authenticate"] == (
        f'Bearer realm="{proxy.url}/_token",service="{proxy.host_port}"'
    )


def test_check_names_route_and_key(tmp_path: Path, registry: RegistryServer) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text(
        textwrap.dedent(
            f"""\
            [auth]
            [[routes]]
            name = "own"
            upstream = "{registry.url}"
            pull = ["@nobody"]
            """
        )
    )
    checked = subprocess.run(
        [*RegproxyProcess([]).argv[:3], "regproxy", "--config", str(routes), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        check=False,
    )
    assert checked.returncode == 1
    assert 'route "own": pull: "@nobody": no group "nobody"' in checked.stderr


def test_a_reload_that_removes_a_rule_closes_the_door(
    proxy: RegproxyProcess, tmp_path: Path, registry: RegistryServer
) -> None:
    creds = ("alice", USERS["alice"])
    assert skopeo_copy(f"{proxy.host_port}/team-a/app:v1", tmp_path / "a", creds=creds).ok
    routes = Path(proxy.argv[-1])
    routes.write_text(routes.read_text().replace('pull = ["alice"]', 'pull = ["bob"]'))
    proxy.send_signal(signal.SIGHUP)
    eventually(lambda: proxy.log_text().count("routes in force") >= 1, 20, what="the reload")
    refused = skopeo_copy(
        f"{proxy.host_port}/team-a/app:v1", tmp_path / "b", creds=creds, check=False
    )
    assert not refused.ok
    assert "access to this repository is denied" in refused.stderr, refused.stderr


def test_htpasswd_on_the_command_line(
    start_proxy, registry: RegistryServer, images: str, tmp_path: Path
) -> None:
    write_htpasswd(tmp_path / "users", USERS)
    proxy = start_proxy(["--upstream", registry.url, "--htpasswd", str(tmp_path / "users")])
    copied = skopeo_copy(
        f"{proxy.host_port}/team-b/app:v1", tmp_path / "b", creds=("alice", USERS["alice"])
    )
    assert copied.digest == images
    anonymous = skopeo_copy(f"{proxy.host_port}/public/app:v1", tmp_path / "p", check=False)
    assert not anonymous.ok and "unauthorized" in anonymous.stderr


def test_a_token_auth_upstream_behind_access_control(
    start_proxy, seeded_token_registry, tmp_path: Path
) -> None:
    """The client's credentials are the proxy's own; the upstream's anonymous tokens are
    fetched by the proxy (the real registry checks every scope)."""
    write_htpasswd(tmp_path / "users", USERS)
    proxy = start_proxy(
        ["--upstream", seeded_token_registry.url, "--htpasswd", str(tmp_path / "users")]
    )
    copied = skopeo_copy(f"{proxy.host_port}/app:v1", tmp_path / "a", creds=("bob", USERS["bob"]))
    assert copied.digest == seeded_token_registry["app:v1"]
    verify_layout(tmp_path / "a")


def test_tokens_of_one_worker_open_every_worker(
    start_proxy, registry: RegistryServer, images: str, tmp_path: Path
) -> None:
    """--workers share the token key: a token from one is good at the others."""
    write_htpasswd(tmp_path / "users.htpasswd", USERS)
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "token-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    routes = tmp_path / "routes.toml"
    routes.write_text(ROUTES.format(upstream=registry.url))
    proxy = start_proxy(["--config", str(routes), "--workers", "2"])
    request = urllib.request.Request(
        f"{proxy.url}/_token?service={proxy.host_port}&scope=repository:team-a/app:pull",
        headers={"Authorization": basic("alice", USERS["alice"])},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        token = json.loads(answer.read())["token"]

    def workers_that_admitted() -> set[object]:
        # A new connection each time: the workers share the listening socket.
        asked = urllib.request.Request(
            f"{proxy.url}/v2/team-a/app/manifests/v1",
            headers={"Authorization": f"Bearer {token}", "Accept": OCI_MANIFEST},
        )
        with urllib.request.urlopen(asked, timeout=10) as answer:
            assert answer.status == 200
        return {
            event.get("worker")
            for event in access_events(proxy)
            if event.get("user") == "alice" and event.get("status") == 200
        }

    eventually(lambda: len(workers_that_admitted()) == 2, 60, what="both workers admitting")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- podman --------------------------------------------------------------------------------------


@pytest.fixture
def podman() -> Iterator[Podman]:
    """podman with its own storage, run root, registries.conf and auth file."""
    with Podman() as client:
        yield client


def test_podman_login_and_pull(podman: Podman, proxy: RegproxyProcess, images: str) -> None:
    host = proxy.host_port
    wrong = podman.run("login", "--tls-verify=false", "-u", "alice", "-p", "nope", host)
    assert wrong.returncode != 0
    assert "invalid username/password" in wrong.stderr, wrong.stderr
    login = podman.run("login", "--tls-verify=false", "-u", "alice", "-p", USERS["alice"], host)
    assert login.returncode == 0, login.stderr
    pulled = podman.run("pull", "--tls-verify=false", f"{host}/team-a/app:v1")
    assert pulled.returncode == 0, pulled.stderr
    digest = podman.run("image", "inspect", "--format", "{{.Digest}}", f"{host}/team-a/app:v1")
    assert digest.stdout.strip() == images
    refused = podman.run("pull", "--tls-verify=false", f"{host}/team-b/app:v1")
    assert refused.returncode != 0
    assert "access to this repository is denied" in refused.stderr, refused.stderr


# -- containerd ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    require_programs("containerd (Debian package containerd)", "ctr", what="containerd")
    with Containerd(tmp_path_factory.mktemp("containerd-access")) as daemon:
        yield daemon


def test_ctr_with_user_pulls_what_the_rules_admit(
    containerd: Containerd, proxy: RegproxyProcess, images: str
) -> None:
    ref = f"{proxy.host_port}/team-a/app:v1"
    creds = f"alice:{USERS['alice']}"
    assert containerd.fetch(ref, "--plain-http", "--user", creds, namespace="alice") == images
    refused = containerd.ctr(
        "content",
        "fetch",
        "--plain-http",
        "--user",
        creds,
        f"{proxy.host_port}/team-b/app:v1",
        namespace="alice",
    )
    assert refused.returncode != 0
    assert "403" in refused.stderr or "denied" in refused.stderr, refused.stderr
    wrong = containerd.ctr(
        "content", "fetch", "--plain-http", "--user", "alice:nope", ref, namespace="wrong"
    )
    assert wrong.returncode != 0
    assert "401" in wrong.stderr or "unauthorized" in wrong.stderr.lower(), wrong.stderr


def test_token_answer_shape(proxy: RegproxyProcess) -> None:
    import base64

    request = urllib.request.Request(
        f"{proxy.url}/_token?service={proxy.host_port}&scope=repository:team-a/app:pull",
        headers={
            "Authorization": "Basic "
            + base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
        },
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        document = json.loads(answer.read())
    assert set(document) == {"token", "access_token", "expires_in", "issued_at"}
    assert document["expires_in"] == 120
