"""The Docker Engine pulling through regproxy: ``docker pull`` and ``docker login`` with a
private ``dockerd`` per test (tests/support/dockerd.py), digests checked."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dockerd import DockerEngine, missing_programs
from tests.support.seed import SeededRegistry
from tests.support.tools import require_capability, require_tools
from tests.support.waiting import eventually

require_tools(missing_programs(), "the Docker Engine")
require_capability(os.geteuid() == 0, "the Docker Engine", "root (dockerd mounts)")


@pytest.fixture
def engine(tmp: Path) -> Iterator[DockerEngine]:
    with DockerEngine(tmp / "docker") as started:
        pids = [started.pid, started.containerd_pid]
        yield started
    # Both stopped, by PID, and nothing of theirs left mounted on the host.
    assert [pid for pid in pids if pid is None or _running(pid)] == []
    assert str(tmp / "docker") not in Path("/proc/self/mountinfo").read_text()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_pull_through_the_proxy(
    engine: DockerEngine, start_proxy, seeded_registry: SeededRegistry
) -> None:
    proxy = start_proxy(["--upstream", seeded_registry.url])
    # A single-platform image and an index (the engine picks its own platform's manifest
    # and records the index's digest).
    for ref in ("app:v1", "multi:v1"):
        assert engine.pull(f"{proxy.host_port}/{ref}") == seeded_registry[ref]
    # The bytes are the engine's now: a layer listed in the image's config.
    inspected = engine.docker("image", "inspect", f"{proxy.host_port}/app:v1")
    assert inspected.returncode == 0, inspected.stderr
    layers = json.loads(inspected.stdout)[0]["RootFS"]["Layers"]
    assert len(layers) == len(seeded_registry.images.app.layers)


def test_login_then_pull_from_a_private_upstream(
    engine: DockerEngine,
    start_proxy,
    prefixed_private_token_registry: SeededRegistry,
    proxy_credentials: tuple[str, str],
) -> None:
    """The client's own credentials pass through the proxy to the upstream's token
    service; ``docker login`` keeps them in the engine's own config directory."""
    seeded = prefixed_private_token_registry
    proxy = start_proxy(["--upstream", seeded.url, "--repo-prefix", "proj"])
    ref = f"{proxy.host_port}/app:v1"
    anonymous = engine.docker("pull", ref)
    assert anonymous.returncode != 0 and "denied" in anonymous.stderr
    user, password = proxy_credentials
    wrong = engine.login(proxy.host_port, user, password + "-wrong")
    assert wrong.returncode != 0 and "unauthorized" in wrong.stderr
    assert proxy.host_port not in json.loads(engine.credentials_file.read_text())["auths"]
    logged_in = engine.login(proxy.host_port, user, password)
    assert logged_in.returncode == 0, logged_in.stderr
    assert engine.pull(ref) == seeded["app:v1"]
    # The file store of this engine's CLI holds the entry (no credential helper, nothing
    # outside its directory), and the password reached no log.
    stored = json.loads(engine.credentials_file.read_text())["auths"][proxy.host_port]
    assert stored["auth"]
    assert password not in engine.log_text()
    assert password not in proxy.log_text()


def test_a_killed_engine_leaves_no_process_and_no_mount(tmp: Path) -> None:
    """The fixture's own guarantee when dockerd dies hard (a test killed mid-pull): its
    containerd does not outlive it, and its data root's bind mount never reached the host."""
    with DockerEngine(tmp / "docker") as engine:
        containerd = engine.containerd_pid
        assert containerd is not None and _running(containerd)
        assert str(engine.data_root) not in Path("/proc/self/mountinfo").read_text()
        os.kill(engine.pid, signal.SIGKILL)
    # A process on its way out has no command line before it is a zombie: the fixture
    # has seen it go; give the kernel the moment it takes to finish the exit.
    eventually(lambda: not _running(containerd), 10, what="containerd's exit")
    assert str(tmp / "docker") not in Path("/proc/self/mountinfo").read_text()
    assert engine.start_seconds is not None and engine.start_seconds < 30
