"""curl for exact HTTP checks: status, every header line, and the body bytes."""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CurlResult:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    # curl's exit status: 0 for a complete transfer; 18 (partial) or 56 for a body
    # the server cut off (accepted only with ``cut_ok``).
    exit_code: int = 0

    @property
    def complete(self) -> bool:
        return self.exit_code == 0

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)

    def error_codes(self) -> list[str]:
        return [error["code"] for error in self.json()["errors"]]


def curl(url: str, *args: str, timeout: float = 30, cut_ok: bool = False) -> CurlResult:
    """Run curl; ``args`` are curl options (-X, -H, -r ...). Redirects are not followed.

    ``cut_ok``: a body cut off after the headers is an answer too (see ``exit_code``)."""
    completed = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "-D", "-", "--max-time", str(timeout), *args, url],
        capture_output=True,
        timeout=timeout + 5,
        check=False,
    )
    accepted = (0, 18, 56) if cut_ok else (0, 18)  # 18 also: a HEAD with a length
    if completed.returncode not in accepted:
        raise AssertionError(f"curl failed ({completed.returncode}): {completed.stderr!r}")
    raw = completed.stdout
    # Skip interim 1xx blocks; the last header block belongs to the final response.
    head, _, body = raw.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/") and b" 100 " in head.split(b"\r\n")[0]:
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    if "-I" in args or "--head" in args:
        body = b""  # curl prints the header block a second time as "output"
    return CurlResult(status, headers, body, completed.returncode)


def head_has_no_body(host: str, port: int, path: str) -> bool:
    """Send a raw HEAD and check that nothing follows the header block."""
    import socket

    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(f"HEAD {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        rest = data.partition(b"\r\n\r\n")[2]
        conn.settimeout(0.3)
        with contextlib.suppress(TimeoutError):
            rest += conn.recv(65536)
        return rest == b""
