"""Run the real regproxy daemon (``python -m twisted regproxy ...``) as a subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal as _signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .ports import free_port, port_open

REPO_ROOT = Path(__file__).resolve().parents[2]


class ProxyStartError(RuntimeError):
    pass


class RegproxyProcess:
    """The daemon on 127.0.0.1:<free port>; a context manager that always stops it.

    ``plugin`` and ``port_option`` exist so the helper can be exercised with another twist
    plugin (e.g. ``plugin="web", port_option="--listen"``).
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        plugin: str = "regproxy",
        port_option: str = "--port",
        port: int | None = None,
        start_timeout: float = 20.0,
        directory: Path | str | None = None,
        cwd: Path | str | None = None,
    ) -> None:
        self.args = list(args)
        self.extra_env = dict(env or {})
        self.plugin = plugin
        self.port_option = port_option
        self.port = port if port is not None else free_port()
        self.start_timeout = start_timeout
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="regproxy-proc-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cwd = Path(cwd) if cwd else REPO_ROOT
        self.stdout_path = self.directory / "stdout.log"
        self.stderr_path = self.directory / "stderr.log"
        self._process: subprocess.Popen[bytes] | None = None
        # twist's own options (--log-format text ...), placed before the plugin name.
        self.twist_args: list[str] = []
        self.returncode: int | None = None

    @property
    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "twisted",
            *self.twist_args,
            self.plugin,
            self.port_option,
            f"tcp:{self.port}:interface=127.0.0.1",
            *self.args,
        ]

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

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(FileNotFoundError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def log_events(self) -> list[dict[str, object]]:
        """The JSON log (the format when stdout is no terminal), one event per line.

        regproxy writes one flat JSON object per line (``regproxy.server.logs``); each is returned
        with the keys tests know from Twisted events added: ``log_namespace`` (the
        ``logger``) and ``log_level`` (from ``severity``). Twisted's own record-separated
        JSON (``twist`` under another plugin) is read too.
        """
        from twisted.logger import LogLevel, eventFromJSON

        levels = {
            "DEBUG": LogLevel.debug,
            "INFO": LogLevel.info,
            "WARNING": LogLevel.warn,
            "ERROR": LogLevel.error,
            "CRITICAL": LogLevel.critical,
        }
        events = []
        for record in self.log_text().replace("\x1e", "\n").splitlines():
            if not record.strip().startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                event = eventFromJSON(record)
                if "logger" in event and "severity" in event and "log_namespace" not in event:
                    event["log_namespace"] = event["logger"]
                    event["log_level"] = levels.get(str(event["severity"]), LogLevel.info)
                events.append(event)
        return events

    def log_messages(self) -> list[str]:
        """Every log event rendered as text, as the text format would show it."""
        from twisted.logger import formatEvent

        return [
            str(event["message"]) if "log_format" not in event else formatEvent(event)
            for event in self.log_events()
        ]

    def start(self) -> RegproxyProcess:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        pythonpath = [str(REPO_ROOT)]
        if env.get("PYTHONPATH"):
            pythonpath.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        env.update(self.extra_env)
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop(_signal.SIGKILL, timeout=5)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = self._process.poll()
            if code is not None:
                raise ProxyStartError(
                    f"{' '.join(self.argv)} exited with {code} before listening:\n"
                    f"{self.log_text()}"
                )
            if port_open("127.0.0.1", self.port):
                return
            if time.monotonic() >= deadline:
                raise ProxyStartError(
                    f"{' '.join(self.argv)} not listening on {self.port} after "
                    f"{self.start_timeout} s:\n{self.log_text()}"
                )
            time.sleep(0.05)

    def send_signal(self, sig: int) -> None:
        assert self._process is not None, "not started"
        self._process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self._process is not None, "not started"
        return self._process.wait(timeout=timeout)

    def stop(self, sig: int = _signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send *sig*, wait up to *timeout* s, then SIGKILL; returns the exit code."""
        process = self._process
        if process is None:
            return self.returncode
        if process.poll() is None:
            try:
                process.send_signal(sig)
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        # anything the daemon left in its session (it should not)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, _signal.SIGKILL)
        self.returncode = process.returncode
        return self.returncode

    def __enter__(self) -> RegproxyProcess:
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
