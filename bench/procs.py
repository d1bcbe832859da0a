"""The nginx baseline process and a description of the machine the suite runs on."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tests.support.ports import free_port, port_open

NGINX_CONF = """\
{user}daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    upstream registry {{
        server {upstream_host_port};
        keepalive 32;
    }}
{cache_path}    server {{
        listen 127.0.0.1:{port}{listen_ssl};
{listener_tls}        client_max_body_size 0;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host {upstream_host_port};
        proxy_buffering on;
        proxy_read_timeout 300s;
{tls}
        # /v2/ itself goes through as is; /v2/<name>/... gets the repository prefix.
        location = /v2/ {{ proxy_pass {scheme}://registry; }}
{cache_location}        location /v2/ {{ proxy_pass {scheme}://registry/v2/{prefix}/; }}
    }}
}}
"""

NGINX_LISTENER_TLS = """\
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
"""

# With ``cache``: what is addressed by digest never changes, so it is kept under its URI
# alone (whatever the client's Accept), an hour, one upstream fetch per URI at a time (the
# lock); tags still go through uncached. A regular expression location wins over the
# prefix location /v2/ below it (quoted: nginx reads braces as a block).
NGINX_CACHE_PATH = """\
    proxy_cache_path {dir}/cache levels=1:2 keys_zone=digests:10m inactive=1h
                     use_temp_path=off;
"""

NGINX_CACHE_LOCATION = """\
        location ~ "^/v2/(.+/(?:manifests|blobs)/sha256:[0-9a-f]{{64}})$" {{
            proxy_pass {scheme}://registry/v2/{prefix}/$1;
            proxy_cache digests;
            proxy_cache_key $uri;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 300s;
            proxy_cache_valid 200 1h;
            proxy_ignore_headers Cache-Control Expires Set-Cookie Vary;
        }}
"""

NGINX_TLS = """\
        proxy_ssl_trusted_certificate {ca};
        proxy_ssl_verify on;
        proxy_ssl_name localhost;
        proxy_ssl_session_reuse on;
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )


class NginxProcess:
    """nginx (``daemon off``, its own config and prefix in *directory*); a context manager."""

    def __init__(
        self,
        directory: Path,
        upstream_host_port: str,
        prefix: str,
        scheme: str = "http",
        ca_file: Path | None = None,
        workers: int = 1,
        listener_tls: tuple[Path, Path] | None = None,
        cache: bool = False,
    ) -> None:
        """*listener_tls*: (certificate, key) to serve HTTPS instead of HTTP; *cache*:
        ``proxy_cache`` for manifests and blobs by digest (in *directory*/cache)."""
        self.directory = Path(directory)
        self.listener_tls = listener_tls
        self.upstream_host_port = upstream_host_port
        self.prefix = prefix
        self.scheme = scheme
        self.ca_file = ca_file
        self.workers = workers
        self.cache = cache
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.listener_tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def config_text(self) -> str:
        tls = NGINX_TLS.format(ca=self.ca_file) if self.scheme == "https" else ""
        listener_tls = ""
        if self.listener_tls:
            cert, key = self.listener_tls
            listener_tls = NGINX_LISTENER_TLS.format(cert=cert, key=key)
        return NGINX_CONF.format(
            user="user root;\n" if os.geteuid() == 0 else "",
            workers=self.workers,
            dir=self.directory,
            upstream_host_port=self.upstream_host_port,
            port=self.port,
            listen_ssl=" ssl" if self.listener_tls else "",
            listener_tls=listener_tls,
            tls=tls,
            scheme=self.scheme,
            prefix=self.prefix,
            cache_path=NGINX_CACHE_PATH.format(dir=self.directory) if self.cache else "",
            cache_location=(
                NGINX_CACHE_LOCATION.format(scheme=self.scheme, prefix=self.prefix)
                if self.cache
                else ""
            ),
        )

    def start(self) -> NginxProcess:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (Debian package nginx-light)")
        (self.directory / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.directory / "nginx.conf"
        conf.write_text(self.config_text())
        argv = [
            binary,
            "-p",
            str(self.directory),
            "-e",
            str(self.directory / "error.log"),
            "-c",
            str(conf),
        ]
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx config rejected:\n{check.stderr}")
        with open(self.directory / "stderr.log", "ab") as err:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
            )
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not start:\n{self.log_text()}")
            time.sleep(0.05)
        return self

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.directory / "error.log").read_text(errors="replace")
        return ""

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()  # the master: fast shutdown of itself and its workers
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def __enter__(self) -> NginxProcess:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class CalibrationServer:
    """``python -m bench.calibrate KIND ...`` as a process; a context manager."""

    def __init__(self, directory: Path, kind: str, args: list[str], listen: str, port: int):
        self.directory = Path(directory)
        self.kind = kind
        self.args = args
        self.listen = listen
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> CalibrationServer:
        import sys

        self.directory.mkdir(parents=True, exist_ok=True)
        root = Path(__file__).resolve().parents[1]
        argv = [sys.executable, "-m", "bench.calibrate", self.kind, "--listen", self.listen]
        with open(self.directory / f"{self.kind}.log", "ab") as err:
            self._process = subprocess.Popen(
                [*argv, *self.args],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=root,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"calibration server {self.kind} did not start:\n{self.log_text()}"
                )
            time.sleep(0.05)
        return self

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.directory / f"{self.kind}.log").read_text(errors="replace")
        return ""

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def __enter__(self) -> CalibrationServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _first_line(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else ""


def machine_info() -> dict[str, str]:
    """What the numbers depend on: CPU, cores, memory, kernel, versions of every part."""
    import twisted

    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    info["nproc"] = str(os.cpu_count())
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory"] = f"{int(line.split()[1]) // 1024} MiB"
    info["kernel"] = platform.release()
    info["python"] = platform.python_version()
    info["twisted"] = twisted.__version__
    with contextlib.suppress(Exception):
        import treq

        info["treq"] = treq.__version__
    with contextlib.suppress(Exception):
        import OpenSSL

        info["pyopenssl"] = OpenSSL.__version__
    root = Path(__file__).resolve().parents[1]
    commit = _first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(root), "status", "--porcelain", "--", "regproxy"])
    info["regproxy_commit"] = commit + ("+modified" if dirty not in ("", "?") else "")
    info["nginx"] = _first_line(["nginx", "-v"])
    info["registry"] = _first_line(["docker-registry", "--version"])
    info["wrk"] = _first_line(["wrk", "-v"])
    info["curl"] = _first_line(["curl", "--version"])
    return info
