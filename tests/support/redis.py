"""Run a real ``redis-server`` (Debian package redis-server) on 127.0.0.1, without persistence.

A context manager: started on a free port in a temporary directory, stopped on exit (also
when the test fails). ``stop()``/``start()`` restart it mid-test on the same port;
``pause()``/``resume()`` (SIGSTOP/SIGCONT) make it a server that accepts connections and never
answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from .ports import free_port, port_open
from .tools import require_program
from .waiting import eventually


def redis_server_binary() -> str:
    """The path of ``redis-server``; skips (or fails, under REGPROXY_REQUIRE_INTEGRATION=1)."""
    return require_program("redis-server (Debian package redis-server)", "Redis")


class RedisServer:
    """One redis-server; ``url`` is what ``[limits] redis`` takes."""

    def __init__(self, directory: Path | str | None = None, password: str | None = None) -> None:
        self.binary = redis_server_binary()
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="regproxy-redis-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.port = free_port()
        self.log_path = self.directory / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        secret = f":{self.password}@" if self.password else ""
        return f"redis://{secret}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def listening() -> bool:
            if self._process is not None and self._process.poll() is not None:
                raise AssertionError(f"redis-server exited:\n{self.log_text()}")
            return port_open("127.0.0.1", self.port)

        eventually(listening, 20, what=lambda: f"redis-server listening\n{self.log_text()}")
        return self

    def stop(self) -> None:
        """Stop the server (its data goes: there is no persistence)."""
        process, self._process = self._process, None
        if process is None:
            return
        if self._paused:
            process.send_signal(signal.SIGCONT)
            self._paused = False
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """SIGSTOP: the kernel still completes handshakes, nothing answers."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)
        self._paused = False

    def cli(self, *args: str) -> str:
        """A redis-cli command's output (for checks)."""
        cli = require_program("redis-cli (Debian package redis-tools)", "Redis")
        command = [cli, "-h", "127.0.0.1", "-p", str(self.port)]
        env = dict(os.environ, REDISCLI_AUTH=self.password) if self.password else None
        done = subprocess.run([*command, *args], capture_output=True, timeout=10, env=env)
        return done.stdout.decode().strip()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
