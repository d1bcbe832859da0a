"""A stand-in for the GCE metadata server (Cloud Run, GKE workload identity, Compute Engine).

google-auth finds it through GCE_METADATA_HOST / GCE_METADATA_IP, so Application Default
Credentials run their real code path on loopback.
"""

from __future__ import annotations

import json
from typing import Any

from tests.support.loopback import LoopbackServer, QuietHandler

_BASE = "/computeMetadata/v1/"


class _MetadataHandler(QuietHandler):
    owner: Any

    def do_GET(self) -> None:
        server: MetadataServer = self.owner
        server.paths.append(self.path)
        if self.headers.get("Metadata-Flavor") != "Google":
            self.send_error(403)
            return
        path = self.path.split("?")[0]
        # google-auth parses an answer as JSON only when its Content-Type says so.
        content_type = "application/json"
        if path in ("", "/"):
            body, content_type = b"", "text/plain"
        elif path == _BASE + "project/project-id":
            body, content_type = b"regproxy-test", "text/plain"
        elif path == _BASE + "instance/service-accounts/default/":
            info = {
                "email": "regproxy@regproxy-test.iam.gserviceaccount.com",
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
                "aliases": ["default"],
            }
            body = json.dumps(info).encode()
        elif path == _BASE + "instance/service-accounts/default/token":
            token = {
                "access_token": server.access_token,
                "expires_in": server.expires_in,
                "token_type": "Bearer",
            }
            body = json.dumps(token).encode()
        else:
            self.send_error(404)
            return
        self.answer(200, body, {"Metadata-Flavor": "Google", "Content-Type": content_type})


class MetadataServer(LoopbackServer):
    handler = _MetadataHandler

    def __init__(self, access_token: str, expires_in: int = 3600) -> None:
        self.access_token = access_token
        self.expires_in = expires_in
        self.paths: list[str] = []
        super().__init__()

    @property
    def environment(self) -> dict[str, str]:
        """What points google-auth at this server."""
        host = f"127.0.0.1:{self.port}"
        return {"GCE_METADATA_HOST": host, "GCE_METADATA_IP": host}

    def token_requests(self) -> int:
        return sum(1 for path in self.paths if "/token" in path)
