"""deploy/docker/update-base-image pins the Dockerfile's base to its index digest."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.support.images import build_multiarch, push
from tests.support.registry import RegistryServer
from tests.support.tools import require_tools

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "docker" / "update-base-image"


def test_update_base_image_pins_the_multi_platform_index(
    registry: RegistryServer, tmp: Path
) -> None:
    require_tools([t for t in ("skopeo", "sha256sum") if shutil.which(t) is None], "tools")
    index = build_multiarch(tmp / "layout", tag="3.11-slim-bookworm")
    push(
        tmp / "layout",
        "3.11-slim-bookworm",
        f"{registry.host_port}/library/python:3.11-slim-bookworm",
    )
    dockerfile = tmp / "Dockerfile"
    dockerfile.write_text((ROOT / "Dockerfile").read_text())
    result = subprocess.run(
        ["sh", str(SCRIPT)],
        env={
            **os.environ,
            "DOCKERFILE": str(dockerfile),
            "BASE_IMAGE_REGISTRY": registry.host_port,
            "SKOPEO_OPTIONS": "--tls-verify=false",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    pinned = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile.read_text(), re.M)
    assert pinned == [f"python:3.11-slim-bookworm@{index.index_digest}"]
    # Nothing else in the Dockerfile changed.
    original = (ROOT / "Dockerfile").read_text().splitlines()
    changed = dockerfile.read_text().splitlines()
    assert [a for a, b in zip(original, changed, strict=True) if a != b] == [
        line for line in original if line.startswith("ARG PYTHON_IMAGE=")
    ]
