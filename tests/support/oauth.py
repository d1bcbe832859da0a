"""A local Google OAuth2 token endpoint, so google-auth runs for real without the internet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.loopback import LoopbackServer, QuietHandler


class _TokenHandler(QuietHandler):
    owner: Any

    def do_POST(self) -> None:
        endpoint: OAuthEndpoint = self.owner
        length = int(self.headers.get("Content-Length", "0"))
        endpoint.grants.append(parse_qs(self.rfile.read(length).decode()))
        token = {
            "access_token": endpoint.access_token,
            "expires_in": endpoint.expires_in,
            "token_type": "Bearer",
        }
        self.answer(200, json.dumps(token).encode(), {"Content-Type": "application/json"})


class OAuthEndpoint(LoopbackServer):
    """Grants ``access_token`` to JWT-bearer assertions, as oauth2.googleapis.com/token does."""

    handler = _TokenHandler

    def __init__(self, access_token: str, expires_in: int = 3600) -> None:
        self.access_token = access_token
        self.expires_in = expires_in
        self.grants: list[dict[str, list[str]]] = []
        super().__init__()

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

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
