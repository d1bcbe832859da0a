"""A private Docker Engine (Debian ``docker.io``) as a real pulling client.

Each ``DockerEngine`` is a ``dockerd`` of its own: its own data root, exec root, pid file,
API socket and ``daemon.json``, the ``containerd`` it manages inside its exec root, the vfs
storage driver (no overlay mounts), no bridge, no iptables, no userland proxy. The docker
CLI gets a config directory of its own (``DOCKER_CONFIG``) and an empty ``PATH``, so no
credential helper is found and ``docker login`` writes only to that directory.

dockerd runs in a mount namespace of its own (``unshare --mount``), where a directory of the
engine's is bound over ``/etc/docker`` and a tmpfs over ``/run/docker``: dockerd 20.10
writes its trust key to ``/etc/docker/key.json`` and plugin sockets under
``/run/docker/plugins`` whatever its options say, and the bind mount it puts on its data
root ("unmount-on-shutdown") stays inside that namespace, which ends with the process even
when it is killed. (At most the two directories are created, empty, when the host has
neither.)

dockerd treats 127.0.0.0/8 registries as insecure: it tries HTTPS, then plain HTTP, so a
proxy on loopback needs no ``--insecure-registry``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .tools import find_program
from .waiting import eventually

# Runs as root in the new mount namespace, then becomes dockerd ("$@") with the same PID.
NAMESPACE_SETUP = (
    'mkdir -p /etc/docker /run/docker && mount --bind "$1" /etc/docker'
    " && mount -t tmpfs -o mode=0700,size=1m regproxy-dockerd /run/docker"
    ' && shift && exec "$@"'
)


class DockerEngineError(RuntimeError):
    pass


def missing_programs() -> list[str]:
    """What a ``DockerEngine`` needs and the host lacks (for ``require_tools``)."""
    wanted = {
        "dockerd": "dockerd (Debian package docker.io)",
        "docker": "docker (Debian package docker.io)",
        "containerd": "containerd (Debian package containerd)",
        "unshare": "unshare (Debian package util-linux)",
        "mount": "mount (Debian package mount)",
    }
    return [described for name, described in wanted.items() if find_program(name) is None]


class DockerEngine:
    """dockerd + its containerd, started and stopped by PID; a context manager.

    ``start_seconds`` is how long the last ``start`` took (until ``/_ping`` answered).
    """

    def __init__(self, directory: Path | str | None = None, start_timeout: float = 60.0) -> None:
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="regproxy-docker-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to 108 bytes: the exec root (containerd's sockets)
        # and the API socket live in a short directory of their own, whatever the test's.
        self.exec_root = Path(tempfile.mkdtemp(prefix="regproxy-dockerd-"))
        self.socket = self.exec_root / "docker.sock"
        self.data_root = self.directory / "data"
        self.etc = self.directory / "etc-docker"
        self.config_dir = self.directory / "cli-config"
        self.log_path = self.directory / "dockerd.log"
        self.start_timeout = start_timeout
        self.start_seconds: float | None = None
        self._empty_path = self.directory / "cli-path"
        self._process: subprocess.Popen[bytes] | None = None
        self._containerd_pid: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def argv(self) -> list[str]:
        dockerd, unshare = find_program("dockerd"), find_program("unshare")
        if dockerd is None or unshare is None:
            raise DockerEngineError(f"not installed: {', '.join(missing_programs())}")
        daemon_json = self.directory / "daemon.json"
        return [
            unshare,
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            NAMESPACE_SETUP,
            "sh",
            str(self.etc),
            dockerd,
            "--config-file",
            str(daemon_json),
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--pidfile",
            str(self.exec_root / "docker.pid"),
            "--host",
            f"unix://{self.socket}",
            "--storage-driver",
            "vfs",
            "--bridge",
            "none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--userland-proxy=false",
            "--log-level",
            "info",
        ]

    def start(self) -> DockerEngine:
        if os.geteuid() != 0:
            raise DockerEngineError("dockerd needs root (mounts, namespaces)")
        for path in (self.data_root, self.etc, self.config_dir, self._empty_path):
            path.mkdir(parents=True, exist_ok=True)
        (self.directory / "daemon.json").write_text("{}\n")
        # No "credsStore": with the empty PATH no helper is detected either.
        (self.config_dir / "config.json").write_text(json.dumps({"auths": {}}) + "\n")
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            # Pulls from 127.0.0.1 must never go through a proxy of the machine's.
            "NO_PROXY": "*",
            "no_proxy": "*",
        }
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_ready()
            self._containerd_pid = eventually(
                self._read_containerd_pid, 10, what="containerd's pid file"
            )
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def _wait_ready(self) -> None:
        process = self._process
        assert process is not None

        def pinged() -> bool:
            if process.poll() is not None:
                raise DockerEngineError(
                    f"dockerd exited with {process.returncode}:\n{self.log_text()[-3000:]}"
                )
            return self.ping()

        try:
            eventually(pinged, self.start_timeout, what="dockerd answering /_ping")
        except AssertionError as error:
            raise DockerEngineError(f"{error}:\n{self.log_text()[-3000:]}") from None

    def ping(self) -> bool:
        """Whether the API answers ``GET /_ping`` with ``OK`` on the engine's socket."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(2)
                conn.connect(str(self.socket))
                conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                answer = b""
                while chunk := conn.recv(4096):
                    answer += chunk
        except OSError:
            return False
        return answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n")[0]

    def _read_containerd_pid(self) -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int((self.exec_root / "containerd" / "containerd.pid").read_text().strip())
        return None

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    @property
    def containerd_pid(self) -> int | None:
        return self._containerd_pid

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")
        return ""

    def stop(self) -> None:
        """SIGTERM to dockerd (it stops its containerd), SIGKILL after 30 s; then its
        containerd by PID if it outlived it; then any mount left under the engine's
        directories."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        containerd, self._containerd_pid = self._containerd_pid, None
        if containerd is not None and self._is_ours(containerd):
            # dockerd starts it with a parent-death signal, so it is normally gone by now.
            with contextlib.suppress(AssertionError):
                eventually(lambda: not self._is_ours(containerd), 10, what="containerd's exit")
            if self._is_ours(containerd):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(containerd, signal.SIGKILL)
                eventually(lambda: not self._is_ours(containerd), 10, what="containerd killed")
        self._unmount_leftovers()

    def _is_ours(self, pid: int) -> bool:
        """Whether ``pid`` is still this engine's containerd (not a reused PID)."""
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        return state != "Z" and str(self.exec_root).encode() in command

    def _unmount_leftovers(self) -> None:
        """The mount namespace took dockerd's mounts with it; this is the guard for a host
        where they leaked into ours (deepest first, lazily)."""
        roots = (str(self.directory), str(self.exec_root))
        points = []
        with contextlib.suppress(FileNotFoundError):
            for line in Path("/proc/self/mountinfo").read_text().splitlines():
                point = line.split()[4].replace("\\040", " ")
                if point.startswith(roots):
                    points.append(point)
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.exec_root, ignore_errors=True)
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> DockerEngine:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self.exec_root, ignore_errors=True)
        if self._own_dir and exc_type is None:
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- the CLI ---------------------------------------------------------------------------------

    def docker(
        self, *args: str, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """The docker CLI against this engine only, with this engine's config directory."""
        binary = find_program("docker")
        if binary is None:
            raise DockerEngineError("docker (the CLI) is not installed")
        env = {
            "PATH": str(self._empty_path),
            "HOME": str(self.config_dir),
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(self.config_dir),
            "NO_PROXY": "*",
        }
        return subprocess.run(
            [binary, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
            stdin=None if input is not None else subprocess.DEVNULL,
        )

    @property
    def credentials_file(self) -> Path:
        return self.config_dir / "config.json"

    def login(self, registry: str, user: str, password: str) -> subprocess.CompletedProcess[str]:
        """``docker login`` (the daemon checks the credentials against *registry*); the
        password goes through stdin, never the command line."""
        return self.docker(
            "login", "--username", user, "--password-stdin", registry, input=password
        )

    def pull(self, ref: str) -> str:
        """``docker pull REF`` (the engine verifies every digest); returns the repository
        digest the engine recorded for it (``RepoDigests``)."""
        pulled = self.docker("pull", ref)
        if pulled.returncode != 0:
            raise AssertionError(f"docker pull {ref} failed: {pulled.stderr[-2000:]}")
        inspected = self.docker("image", "inspect", "--format", "{{json .RepoDigests}}", ref)
        if inspected.returncode != 0:
            raise AssertionError(f"docker image inspect {ref}: {inspected.stderr[-2000:]}")
        repository = _repository(ref)
        for entry in json.loads(inspected.stdout) or []:
            name, _, digest = entry.partition("@")
            if name == repository:
                return str(digest)
        raise AssertionError(f"no digest of {repository} in RepoDigests: {inspected.stdout}")


def _repository(ref: str) -> str:
    """``host:port/name:tag`` or ``host:port/name@digest`` -> ``host:port/name``."""
    name = ref.split("@", 1)[0]
    last = name.rsplit("/", 1)
    if ":" in last[-1]:
        name = name[: name.rindex(":")]
    return name
