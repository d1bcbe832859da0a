"""A stand-in for a blob storage host (S3, GCS) that a registry redirects blob GETs to.

Serves the registry's filesystem storage read-only and records the headers of every
request, so tests can check that no registry credentials ever reach it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.loopback import LoopbackServer, QuietHandler


class _StorageHandler(QuietHandler):
    owner: Any

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        host: StorageHost = self.owner
        host.requests.append({k.lower(): v for k, v in self.headers.items()})
        path = (host.root / self.path.split("?")[0].lstrip("/")).resolve()
        if not path.is_relative_to(host.root.resolve()) or not path.is_file():
            self.send_error(404)
            return
        self.answer(200, path.read_bytes())


class StorageHost(LoopbackServer):
    handler = _StorageHandler

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[dict[str, str]] = []
        super().__init__()
