"""containerd as a real pulling client: its own resolver (HEAD first, its token handling,
``?ns=`` on mirrors), driven with ``ctr`` against a daemon the tests start and stop."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from .waiting import eventually

CONFIG = """version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
]
[grpc]
  address = "{root}/containerd.sock"
[ttrpc]
  address = "{root}/containerd.ttrpc.sock"
[debug]
  address = ""
"""


SOCKET_DIRECTORY_MAX = 70  # leaves room for "/containerd.ttrpc.sock" and more


class Containerd:
    def __init__(self, directory: Path | None = None) -> None:
        # Its sockets live in this directory, and a unix socket's path has at most 104
        # bytes: a test's deep temporary directory (pytest-xdist adds a level) is too long.
        if directory is None or len(str(directory)) > SOCKET_DIRECTORY_MAX:
            directory = Path(tempfile.mkdtemp(prefix="regproxy-containerd-"))
        self.directory = Path(directory)
        self.socket = self.directory / "containerd.sock"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> Containerd:
        config = self.directory / "config.toml"
        config.write_text(CONFIG.format(root=self.directory))
        log = (self.directory / "containerd.log").open("wb")
        self._process = subprocess.Popen(
            ["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        process = self._process

        def serving() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"containerd exited with {process.returncode}")
            return self.socket.exists()

        try:
            eventually(serving, 20, what="containerd's socket")
        except AssertionError as error:
            self.stop()
            log = (self.directory / "containerd.log").read_text()[-2000:]
            raise RuntimeError(f"{error}\n{log}") from None
        return self

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def ctr(self, *args: str, namespace: str = "test") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "-a", str(self.socket), "-n", namespace, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def fetch(self, ref: str, *extra: str, namespace: str = "test") -> str:
        """``ctr content fetch`` (containerd verifies every digest); returns the image's
        digest as containerd recorded it."""
        fetched = self.ctr("content", "fetch", "--all-platforms", *extra, ref, namespace=namespace)
        if fetched.returncode != 0:
            raise AssertionError(f"ctr content fetch {ref} failed: {fetched.stderr[-2000:]}")
        listing = self.ctr("images", "ls", namespace=namespace).stdout
        for line in listing.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == ref:
                return fields[2]
        raise AssertionError(f"{ref} not among containerd's images:\n{listing}")

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
