"""A local Google OAuth2 token endpoint, so google-auth runs for real without the internet."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.ports import free_port


class OAuthEndpoint:
    """Grants ``access_token`` to JWT-bearer assertions, as oauth2.googleapis.com/token does."""

    def __init__(self, access_token: str, expires_in: int = 3600) -> None:
        self.access_token = access_token
        self.expires_in = expires_in
        self.port = free_port()
        self.grants: list[dict[str, list[str]]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                endpoint.grants.append(form)
                body = json.dumps(
                    {
                        "access_token": endpoint.access_token,
                        "expires_in": endpoint.expires_in,
                        "token_type": "Bearer",
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def token_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def write_key_file(self, path: Path) -> Path:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        path.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": "regproxy-test",
                    "private_key_id": "test-key",
                    "private_key": pem,
                    "client_email": "proxy@regproxy-test.iam.gserviceaccount.com",
                    "client_id": "1",
                    "token_uri": self.token_uri,
                }
            )
        )
        return path

    def __enter__(self) -> OAuthEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
