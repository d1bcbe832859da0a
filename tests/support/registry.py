"""Run the CNCF distribution registry (Debian ``docker-registry``, 2.8) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from .ports import free_port
from .tls import TLSFiles
from .tokens import TokenIssuer
from .waiting import eventually

REGISTRY_BINARY = "docker-registry"


def registry_binary() -> str | None:
    """Path of the registry binary, or None when it is not installed."""
    return shutil.which(os.environ.get("REGPROXY_REGISTRY_BINARY", REGISTRY_BINARY))


def write_htpasswd(path: Path, users: dict[str, str]) -> None:
    """Write a bcrypt htpasswd file (the only hash distribution accepts)."""
    import bcrypt

    lines = []
    for user, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        lines.append(f"{user}:{hashed}\n")
    path.write_text("".join(lines))


def _yaml(value: object, indent: int = 0) -> str:
    """Tiny YAML emitter for nested dicts of scalars/lists (JSON scalars are valid YAML)."""
    pad = "  " * indent
    out = []
    assert isinstance(value, dict)
    for key, item in value.items():
        if isinstance(item, dict):
            out.append(f"{pad}{key}:\n{_yaml(item, indent + 1)}")
        else:
            out.append(f"{pad}{key}: {json.dumps(item)}\n")
    return "".join(out)


class RegistryServer:
    """A distribution registry in a temporary directory; a context manager.

    ``auth`` is ``"none"``, ``"htpasswd"`` (``users`` name -> password) or ``"token"`` (needs
    ``token_issuer``). ``tls`` serves HTTPS with the given certificate.
    """

    def __init__(
        self,
        auth: str = "none",
        users: dict[str, str] | None = None,
        token_issuer: TokenIssuer | None = None,
        tls: TLSFiles | None = None,
        catalog_max_entries: int | None = 50,
        directory: Path | str | None = None,
        start_timeout: float = 20.0,
        extra_config: dict[str, object] | None = None,
    ) -> None:
        self.extra_config = dict(extra_config or {})
        if auth not in ("none", "htpasswd", "token"):
            raise ValueError(f"unknown auth mode {auth!r}")
        if auth == "token" and token_issuer is None:
            raise ValueError("auth='token' needs a token_issuer")
        if auth == "htpasswd" and not users:
            raise ValueError("auth='htpasswd' needs users")
        self.auth = auth
        self.users: dict[str, str] = dict(users or {})
        self.token_issuer = token_issuer
        self.tls = tls
        self.catalog_max_entries = catalog_max_entries
        self.start_timeout = start_timeout
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="regproxy-registry-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config_path = self.directory / "config.yml"
        self.log_path = self.directory / "registry.log"
        self._process: subprocess.Popen[bytes] | None = None

    # -- addresses -------------------------------------------------------------------------------

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host_port}"

    @property
    def credentials(self) -> tuple[str, str] | None:
        """The first configured user (for htpasswd and token registries), if any."""
        if self.auth == "token" and self.token_issuer is not None and self.token_issuer.users:
            return next(iter(self.token_issuer.users.items()))
        if self.users:
            return next(iter(self.users.items()))
        return None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- configuration ---------------------------------------------------------------------------

    def config(self) -> dict[str, object]:
        http: dict[str, object] = {
            "addr": self.host_port,
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        }
        if self.tls is not None:
            http["tls"] = {"certificate": str(self.tls.cert), "key": str(self.tls.key)}
        storage_dir = self.directory / "storage"
        storage_dir.mkdir(exist_ok=True)
        config: dict[str, object] = {
            "version": "0.1",
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(storage_dir)},
                "delete": {"enabled": True},
                "cache": {"blobdescriptor": "inmemory"},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http,
        }
        if self.catalog_max_entries is not None:
            config["catalog"] = {"maxentries": self.catalog_max_entries}
        if self.auth == "htpasswd":
            htpasswd = self.directory / "htpasswd"
            write_htpasswd(htpasswd, self.users)
            config["auth"] = {"htpasswd": {"realm": "regproxy-test", "path": str(htpasswd)}}
        elif self.auth == "token":
            issuer = self.token_issuer
            assert issuer is not None
            config["auth"] = {
                "token": {
                    "realm": issuer.realm,
                    "service": issuer.service,
                    "issuer": issuer.issuer,
                    "rootcertbundle": str(issuer.cert_path),
                }
            }
        config.update(self.extra_config)
        return config

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> RegistryServer:
        binary = registry_binary()
        if binary is None:
            raise RuntimeError(f"{REGISTRY_BINARY} is not installed")
        self.config_path.write_text(_yaml(self.config()))
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        env["OTEL_TRACES_EXPORTER"] = "none"
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        return ssl.create_default_context(cafile=str(self.tls.ca_cert))

    def _wait_ready(self) -> None:
        context = self._ssl_context()
        process = self._process
        assert process is not None
        last_error: list[Exception] = []

        def answers() -> bool:
            if process.poll() is not None:
                log = self.log_text()
                raise RuntimeError(f"registry exited with {process.returncode}:\n{log}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=2, context=context):
                    return True
            except urllib.error.HTTPError as e:
                if e.code == 401:  # auth configured: it answers, that is enough
                    return True
                last_error[:] = [e]
            except (OSError, ssl.SSLError) as e:
                last_error[:] = [e]
            return False

        try:
            eventually(answers, self.start_timeout, what=f"registry on {self.url} ready")
        except AssertionError as error:
            raise TimeoutError(f"{error} ({last_error}):\n{self.log_text()}") from None

    def stop(self) -> int | None:
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        return process.returncode

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def __enter__(self) -> RegistryServer:
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
