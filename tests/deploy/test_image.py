"""The container image, built with podman on a stand-in base: its size, its user, a
read-only start and a pull through it (docs/image.rst).

The pinned base (python:3.11-slim) is not pulled: deploy/docker/standin-base builds an
equivalent from a Debian mirror (cached outside the checkout, keyed by the script), and
the build needs PyPI for the locked wheels. Cold (no cached base, no cached layers) this
takes about a minute or two; warm (podman's layer cache, the base cached) a few seconds
plus what changed in regproxy's sources.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import standin
from tests.support.images import build_image, push, skopeo_binary, skopeo_copy
from tests.support.ports import free_port, port_open
from tests.support.registry import RegistryServer, registry_binary
from tests.support.tools import require_capability, require_programs, require_tools
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "deploy" / "docker" / "standin-base"
TAG = "localhost/regproxy-test-image:latest"
SIZE_LIMIT = 150 * 1000 * 1000  # bytes, as podman counts its MB
USER = "10001:10001"
# podman as root asks runc for higher nofile/nproc limits than a host without
# CAP_SYS_RESOURCE can grant ("error setting rlimit type 7"); asking for modest ones
# works everywhere.
LIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
# Locally added CAs (an intercepting proxy's, say) that pip in the build stage needs to
# reach the index: the Dockerfile's EXTRA_CA_CERTS.
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
# What a read-only root must never show: Twisted rewriting a stale plugin cache, or
# anything else that tries to write.
WRITE_ERRORS = ("dropin.cache", "Read-only file system", "Permission denied", "Traceback")

podman, _debootstrap = require_programs(
    "podman (Debian package podman)", "debootstrap (Debian package debootstrap)", what="image"
)
require_capability(os.geteuid() == 0, "image", "root (debootstrap, podman's storage)")
require_tools(
    [
        tool
        for tool, found in (("skopeo", skopeo_binary()), ("docker-registry", registry_binary()))
        if found is None
    ],
    "image",
)


def _podman(*args: str, timeout: float = 60) -> str:
    result = subprocess.run(
        [podman, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"podman {' '.join(args)}:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The image's ID, built from this checkout on the stand-in base."""
    build_args = ["--build-arg", f"PYTHON_IMAGE={standin.base_image()}"]
    cas = "".join(path.read_text() for path in sorted(LOCAL_CAS.glob("*.crt")))
    if cas:
        build_args += ["--build-arg", f"EXTRA_CA_CERTS={cas}"]
    if os.environ.get("PIP_INDEX_URL"):
        build_args += ["--build-arg", f"PIP_INDEX_URL={os.environ['PIP_INDEX_URL']}"]
    iidfile = tmp_path_factory.mktemp("image") / "iid"
    build = subprocess.run(
        [podman, "build", *LIMITS, *build_args, "--iidfile", str(iidfile), "-t", TAG, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    return iidfile.read_text().strip()


@pytest.fixture
def container_name() -> Iterator[str]:
    name = f"regproxy-test-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        subprocess.run(
            [podman, "rm", "--force", "--time", "0", name],
            capture_output=True,
            timeout=60,
            check=False,
        )


def test_image_is_under_150_mb(image: str) -> None:
    size = int(_podman("image", "inspect", "--format", "{{.Size}}", image))
    assert size < SIZE_LIMIT, f"{size / 1e6:.1f} MB"


def test_image_runs_as_numeric_non_root_user(image: str) -> None:
    assert _podman("image", "inspect", "--format", "{{.Config.User}}", image).strip() == USER
    ids = _podman(
        "run", "--rm", *LIMITS, "--entrypoint", "python3", image,
        "-c", "import os, pwd; print(os.getuid(), os.getgid(), pwd.getpwuid(os.getuid())[0])",
    )  # fmt: skip
    assert ids.split() == ["10001", "10001", "regproxy"]


def test_read_only_container_pulls_through(
    image: str, tmp_path: Path, container_name: str
) -> None:
    """Two workers on a read-only root (with the /tmp that docs/image.rst says to mount)
    serve a pull from a real registry; the log shows no write attempt, and SIGTERM
    stops it cleanly."""
    with RegistryServer(directory=tmp_path / "registry") as registry:
        pushed = build_image(tmp_path / "layout", layers=(4096, 300_000), tag="v1")
        push(tmp_path / "layout", "v1", f"{registry.host_port}/team/app:v1")
        port = free_port()
        _podman(
            "run", "--detach", "--name", container_name, *LIMITS, "--network", "host",
            "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp",
            image,
            "--port", f"tcp:{port}:interface=127.0.0.1", "--upstream", registry.url,
            "--workers", "2", "--log-format", "text",
        )  # fmt: skip

        def logs() -> str:
            result = subprocess.run(
                [podman, "logs", container_name], capture_output=True, text=True, timeout=60
            )
            return result.stdout + result.stderr

        eventually(lambda: port_open("127.0.0.1", port), 60, what=logs)
        copied = skopeo_copy(f"127.0.0.1:{port}/team/app:v1", tmp_path / "pulled")
        assert copied.digest == pushed.digest
        _podman("stop", "--time", "20", container_name)
        status = _podman("wait", container_name).strip()
        log = logs()
    assert status == "0", log
    for error in WRITE_ERRORS:
        assert error not in log, log
    assert "every worker drained and exited" in log
