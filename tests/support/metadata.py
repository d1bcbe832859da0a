"""A stand-in for the GCE metadata server (Cloud Run, GKE workload identity, Compute Engine).

google-auth finds it through GCE_METADATA_HOST / GCE_METADATA_IP, so Application Default
Credentials run their real code path on loopback.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.ports import free_port


class MetadataServer:
    def __init__(self, access_token: str, expires_in: int = 3600) -> None:
        self.access_token = access_token
        self.expires_in = expires_in
        self.port = free_port()
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.paths.append(self.path)
                if self.headers.get("Metadata-Flavor") != "Google":
                    self.send_error(403)
                    return
                path = self.path.split("?")[0]
                base = "/computeMetadata/v1/"
                if path in ("", "/"):
                    self._answer("text/plain", b"")
                elif path == base + "project/project-id":
                    self._answer("text/plain", b"regproxy-test")
                elif path == base + "instance/service-accounts/default/":
                    info = {
                        "email": "regproxy@regproxy-test.iam.gserviceaccount.com",
                        "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
                        "aliases": ["default"],
                    }
                    self._answer("application/json", json.dumps(info).encode())
                elif path == base + "instance/service-accounts/default/token":
                    token = {
                        "access_token": server.access_token,
                        "expires_in": server.expires_in,
                        "token_type": "Bearer",
                    }
                    self._answer("application/json", json.dumps(token).encode())
                else:
                    self.send_error(404)

            def _answer(self, content_type: str, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def environment(self) -> dict[str, str]:
        """What points google-auth at this server."""
        host = f"127.0.0.1:{self.port}"
        return {"GCE_METADATA_HOST": host, "GCE_METADATA_IP": host}

    def token_requests(self) -> int:
        return sum(1 for path in self.paths if "/token" in path)

    def __enter__(self) -> MetadataServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
