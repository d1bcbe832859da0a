"""podman isolated from the machine: storage, run root, registries.conf, policy and auth
file of its own in a temporary directory (short: podman refuses a run root over 50
characters), removed afterwards with everything it pulled.

``Podman(insecure=["127.0.0.1:PORT"])`` marks those registries insecure in its
registries.conf, which podman needs to speak plain HTTP to them."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from .images import skopeo_env
from .tools import require_programs


class Podman:
    def __init__(self, insecure: list[str] | None = None) -> None:
        require_programs("podman (Debian package podman)", what="podman")
        self.home = home = Path(tempfile.mkdtemp(prefix="rp-podman-"))
        registries = ["unqualified-search-registries = []\n"]
        for location in insecure or []:
            registries.append(f'[[registry]]\nlocation = "{location}"\ninsecure = true\n')
        (home / "registries.conf").write_text("\n".join(registries))
        (home / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        (home / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{home}/root"\nrunroot = "{home}/run"\n'
        )
        (home / "containers.conf").write_text("")
        (home / "auth.json").write_text("{}")
        (home / "xdg").mkdir()
        self.base = [
            "podman",
            "--root",
            str(home / "root"),
            "--runroot",
            str(home / "run"),
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "none",
        ]

    def env(self) -> dict[str, str]:
        env = skopeo_env()
        home = self.home
        env.update(
            CONTAINERS_REGISTRIES_CONF=str(home / "registries.conf"),
            REGISTRY_AUTH_FILE=str(home / "auth.json"),
            CONTAINERS_POLICY_JSON=str(home / "policy.json"),
            CONTAINERS_CONF=str(home / "containers.conf"),
            CONTAINERS_STORAGE_CONF=str(home / "storage.conf"),
            XDG_RUNTIME_DIR=str(home / "xdg"),
        )
        return env

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.base, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            check=False,
        )

    def close(self) -> None:
        try:
            self.run("system", "reset", "--force", timeout=120)
        finally:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Podman:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
