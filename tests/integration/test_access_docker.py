"""Access control with the Docker Engine: ``docker login`` to the proxy as an htpasswd user
(the proxy is the token service), ``docker pull`` of a repository the rules admit with the
digest the engine recorded checked, a repository they do not admit refused, and a wrong
password refused at login. One private ``dockerd`` (tests/support/dockerd.py) for the
module; its CLI keeps credentials in its own DOCKER_CONFIG only."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.dockerd import DockerEngine, missing_programs
from tests.support.images import push
from tests.support.proxy import RegproxyProcess
from tests.support.registry import RegistryServer, write_htpasswd
from tests.support.seed import StandardImages
from tests.support.tools import require_capability, require_tools

require_tools(missing_programs(), "the Docker Engine")
require_capability(os.geteuid() == 0, "the Docker Engine", "root (dockerd mounts)")

USERS = {"carol": "carol-Docker-Secret-3", "dave": "dave-Docker-Secret-4"}
ROUTES = """\
[auth]
htpasswd = "users.htpasswd"
token_key = "token-key.pem"

[[routes]]
name = "own"
upstream = "{upstream}"
  [[routes.access]]
  repos = ["docker-a/**"]
  pull = ["carol"]
  [[routes.access]]
  repos = ["docker-b/**"]
  pull = ["dave"]
"""


@pytest.fixture(scope="module")
def digest(registry: RegistryServer, standard_images: StandardImages) -> str:
    for name in ("docker-a/app", "docker-b/app"):
        push(standard_images.layout, "app", f"{registry.host_port}/{name}:v1")
    return standard_images.app.digest


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, registry: RegistryServer, digest: str
) -> Iterator[RegproxyProcess]:
    directory = tmp_path_factory.mktemp("docker-access")
    write_htpasswd(directory / "users.htpasswd", USERS)
    key = ec.generate_private_key(ec.SECP256R1())
    (directory / "token-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "routes.toml").write_text(ROUTES.format(upstream=registry.url))
    process = RegproxyProcess(
        ["--config", str(directory / "routes.toml")], directory=directory / "proc"
    )
    try:
        yield process.start()
    finally:
        process.stop()
        print(f"--- regproxy output ---\n{process.log_text()}")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    with DockerEngine(tmp_path_factory.mktemp("engine") / "docker") as started:
        yield started


@pytest.fixture
def logged_out(engine: DockerEngine, proxy: RegproxyProcess) -> Iterator[DockerEngine]:
    """The engine, without credentials for the proxy before and after the test."""
    engine.docker("logout", proxy.host_port)
    yield engine
    engine.docker("logout", proxy.host_port)


def stored_auths(engine: DockerEngine) -> dict[str, object]:
    auths: dict[str, object] = json.loads(engine.credentials_file.read_text()).get("auths", {})
    return auths


def test_a_wrong_password_fails_at_login(logged_out: DockerEngine, proxy: RegproxyProcess) -> None:
    engine = logged_out
    for user, password in (("carol", "not-carols"), ("nobody", USERS["carol"])):
        wrong = engine.login(proxy.host_port, user, password)
        assert wrong.returncode != 0
        assert "unauthorized" in wrong.stderr.lower(), wrong.stderr
    assert proxy.host_port not in stored_auths(engine)
    assert "not-carols" not in proxy.log_text()


def test_login_then_pull_what_the_rules_admit(
    logged_out: DockerEngine, proxy: RegproxyProcess, digest: str
) -> None:
    engine = logged_out
    ref = f"{proxy.host_port}/docker-a/app:v1"
    anonymous = engine.docker("pull", ref)
    assert anonymous.returncode != 0
    logged_in = engine.login(proxy.host_port, "carol", USERS["carol"])
    assert logged_in.returncode == 0, logged_in.stderr
    assert engine.pull(ref) == digest
    # By digest as well: the engine checks the manifest against the digest it asked for.
    assert engine.pull(f"{proxy.host_port}/docker-a/app@{digest}") == digest
    # The credentials are in this engine's CLI directory, and nowhere in a log.
    assert proxy.host_port in stored_auths(engine)
    home = Path(os.environ.get("HOME", "/root")) / ".docker" / "config.json"
    assert not home.exists() or proxy.host_port not in home.read_text()
    assert USERS["carol"] not in proxy.log_text()
    assert USERS["carol"] not in engine.log_text()
    users = {
        event.get("user")
        for event in proxy.log_events()
        if str(event.get("path", "")).startswith("/v2/docker-a/")
    }
    assert "carol" in users


def test_a_repository_the_rules_do_not_admit_is_refused(
    logged_out: DockerEngine, proxy: RegproxyProcess
) -> None:
    engine = logged_out
    logged_in = engine.login(proxy.host_port, "carol", USERS["carol"])
    assert logged_in.returncode == 0, logged_in.stderr
    refused = engine.docker("pull", f"{proxy.host_port}/docker-b/app:v1")
    assert refused.returncode != 0
    assert "denied" in refused.stderr, refused.stderr
    listed = engine.docker("image", "ls", "--format", "{{.Repository}}")
    assert f"{proxy.host_port}/docker-b/app" not in listed.stdout
    # The access log names who was refused.
    refusals = [
        event
        for event in proxy.log_events()
        if event.get("log_namespace") == "regproxy.access"
        and str(event.get("path", "")).startswith("/v2/docker-b/")
    ]
    assert refusals and {(e["status"], e.get("user")) for e in refusals} == {(403, "carol")}
