"""nginx in front of regproxy replicas, with the documented example configuration
(deploy/nginx/regproxy-consistent-hash.conf) run as it is written: only its replica
addresses and its listen address are replaced."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .ports import free_port, port_open
from .waiting import eventually

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "deploy" / "nginx" / "regproxy-consistent-hash.conf"

# The example's placeholder replicas and listener.
_SERVER = re.compile(r"^(\s*)server 10\.0\.0\.\d+:8080( [^;]*)?;\n", re.M)
_LISTEN = re.compile(r"^(\s*)listen 80;$", re.M)
_HASH = re.compile(r"^\s*hash \$regproxy_hash_key consistent;\n", re.M)

# Around the example: a prefix of its own, and an access log naming the replica that
# answered each request and the key it was chosen by.
WRAPPER = """\
{user}daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format hashing '$request_method $uri $status $upstream_addr $regproxy_hash_key';
    access_log {dir}/access.log hashing;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    include {dir}/regproxy.conf;
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def example_config(servers: Sequence[str], listen: str, *, hashed: bool = True) -> str:
    """The example with *servers* (``host:port``) as its replicas and *listen* as its
    listener; ``hashed=False`` drops the hash (nginx's round robin), for comparisons."""
    text = EXAMPLE.read_text()
    placeholders = _SERVER.findall(text)
    if len(placeholders) != 3 or len(_LISTEN.findall(text)) != 1:
        raise AssertionError(f"{EXAMPLE}: expected three example servers and one listen")
    indent, params = placeholders[0]
    lines = "".join(f"{indent}server {server}{params};\n" for server in servers)
    text = _SERVER.sub("", text, count=len(placeholders) - 1)
    text = _SERVER.sub(lambda _: lines, text, count=1)
    text = _LISTEN.sub(lambda m: f"{m.group(1)}listen {listen};", text)
    if not hashed:
        text, count = _HASH.subn("", text)
        assert count == 1, "the example has no hash directive"
    return text


class Nginx:
    """nginx (``daemon off``) with *site* included in its ``http`` block; a context manager.

    *site* must define ``$regproxy_hash_key`` (the access log names it), as the example does.
    """

    def __init__(
        self, site: str, directory: Path | str | None = None, port: int | None = None
    ) -> None:
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="regproxy-nginx-"))
        self.port = port if port is not None else free_port()
        self.site = site
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def in_front_of(
        cls,
        servers: Sequence[str],
        directory: Path | str | None = None,
        *,
        hashed: bool = True,
    ) -> Nginx:
        port = free_port()
        site = example_config(servers, f"127.0.0.1:{port}", hashed=hashed)
        return cls(site, directory, port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def start(self) -> Nginx:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (Debian package nginx-light)")
        (self.directory / "tmp").mkdir(parents=True, exist_ok=True)
        (self.directory / "regproxy.conf").write_text(self.site)
        conf = self.directory / "nginx.conf"
        conf.write_text(
            WRAPPER.format(
                # As root, workers would otherwise run as nobody, unable to write here.
                user="user root;\n" if os.geteuid() == 0 else "",
                workers=2,
                dir=self.directory,
            )
        )
        argv = [binary, "-p", str(self.directory), "-e", str(self.directory / "error.log")]
        argv += ["-c", str(conf)]
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"nginx refused the configuration:\n{check.stderr}")
        with open(self.directory / "stderr.log", "ab") as err:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
            )
        process = self._process

        def listening() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited with {process.returncode}:\n{self.log_text()}")
            return port_open("127.0.0.1", self.port)

        try:
            eventually(listening, 10, what=f"nginx listening on {self.port}")
        except BaseException:
            self.stop()
            raise
        return self

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.directory / "error.log").read_text(errors="replace")
        return ""

    def requests(self) -> list[tuple[str, str, int, str, str]]:
        """(method, path, status, replica address, hash key) of each request logged so far
        (nginx writes the line when the answer is complete)."""
        lines = []
        with contextlib.suppress(FileNotFoundError):
            for line in (self.directory / "access.log").read_text().splitlines():
                method, path, status, replica, key = line.split(" ")
                lines.append((method, path, int(status), replica, key))
        return lines

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()  # the master: a fast shutdown of itself and its workers
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, 9)  # a worker the master left behind

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._own_dir and exc_type is None:
            shutil.rmtree(self.directory, ignore_errors=True)
