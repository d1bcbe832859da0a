"""Helper processes for the cache tests that need real processes on one cache directory
(real locks, real files)."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

WORKTREE = Path(__file__).resolve().parents[2]


class Helper:
    """A separate Python process running ``script`` with ``root`` and ``args``.

    The script prints lines; ``expect`` waits (with a deadline) for one. ``send`` writes a line
    to its stdin. The process is always killed by ``stop`` (tests call it in a finally).
    """

    def __init__(self, script: str, *args: str) -> None:
        code = "import sys, os\n" + textwrap.dedent(script)
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=WORKTREE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(WORKTREE)},
        )
        self._buffer = b""
        self.lines: list[str] = []

    def expect(self, line: str, timeout: float = 20.0) -> None:
        """Wait for ``line`` (raw reads on the pipe: a buffered reader would hide lines from
        the selector)."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        selector = selectors.DefaultSelector()
        selector.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while True:
                while b"\n" in self._buffer:
                    got, self._buffer = self._buffer.split(b"\n", 1)
                    self.lines.append(got.decode())
                    if got.decode().strip() == line:
                        return
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"helper did not say {line!r} in time"
                if selector.select(remaining):
                    chunk = os.read(fd, 65536)
                    assert chunk, f"helper exited before saying {line!r}: {self.lines}"
                    self._buffer += chunk
        finally:
            selector.close()

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def wait(self, timeout: float = 20.0) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        self.kill()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


class Server:
    """A test server script (a real reactor in a process of its own) that prints ``port N``."""

    def __init__(self, script: Path, *args: str) -> None:
        self.helper = Helper(
            "import runpy; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')",
            str(script),
            *args,
        )
        deadline = time.monotonic() + 30
        while not any(line.startswith("port ") for line in self.helper.lines):
            assert time.monotonic() < deadline, "the server did not start"
            with contextlib.suppress(AssertionError):
                self.helper.expect("never", timeout=0.2)
        self.port = int(next(ln for ln in self.helper.lines if ln.startswith("port ")).split()[1])
        self.base = f"http://127.0.0.1:{self.port}"

    def stats(self) -> Any:
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with direct.open(f"{self.base}/stats", timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.helper.stop()
