"""Fixtures starting real registries, a token issuer and (through a factory) the proxy.

Everything listens on 127.0.0.1 and is stopped at teardown, also when a test fails. Missing
``docker-registry``/``skopeo`` skips the integration tests, unless REGPROXY_REQUIRE_INTEGRATION=1
(CI), where it fails them.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.images import skopeo_binary
from tests.support.proxy import RegproxyProcess
from tests.support.registry import RegistryServer, registry_binary
from tests.support.rgw import RGWServer
from tests.support.rgw import missing_programs as rgw_missing_programs
from tests.support.seed import SeededRegistry, StandardImages, build_standard_images, seed_registry
from tests.support.tls import TLSFiles, make_ca_and_cert
from tests.support.tokens import TokenIssuer
from tests.support.tools import require_tools

PROXY_USER = "proxyuser"


def _missing_tools() -> list[str]:
    missing = []
    if registry_binary() is None:
        missing.append("docker-registry (Debian package docker-registry)")
    if skopeo_binary() is None:
        missing.append("skopeo (Debian package skopeo)")
    return missing


@pytest.fixture(scope="session", autouse=True)
def integration_tools() -> None:
    """Skip (or fail, with REGPROXY_REQUIRE_INTEGRATION=1) when the real tools are missing."""
    require_tools(_missing_tools(), "integration tools")


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """A fresh per-test directory (alias of tmp_path)."""
    return tmp_path


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("integration")


@pytest.fixture(scope="session")
def proxy_credentials() -> tuple[str, str]:
    """("proxyuser", random password) accepted by the htpasswd and token registries."""
    return PROXY_USER, secrets.token_urlsafe(12)


@pytest.fixture(scope="session")
def tls_files(session_dir: Path) -> TLSFiles:
    """Test CA + server certificate for 127.0.0.1/localhost (``.cert_dir`` has only ca.crt)."""
    return make_ca_and_cert(session_dir / "tls")


# -- registries ----------------------------------------------------------------------------------


def _run_registry(server: RegistryServer) -> Iterator[RegistryServer]:
    with server:
        yield server


@pytest.fixture(scope="session")
def registry(session_dir: Path) -> Iterator[RegistryServer]:
    """Anonymous (no auth) plain-HTTP registry."""
    yield from _run_registry(RegistryServer(directory=session_dir / "registry-anon"))


@pytest.fixture(scope="session")
def htpasswd_registry(
    session_dir: Path, proxy_credentials: tuple[str, str]
) -> Iterator[RegistryServer]:
    """Registry with htpasswd Basic auth; only ``proxyuser`` (``.credentials``) is accepted."""
    user, password = proxy_credentials
    yield from _run_registry(
        RegistryServer(
            auth="htpasswd", users={user: password}, directory=session_dir / "registry-htpasswd"
        )
    )


@pytest.fixture(scope="session")
def token_issuer(session_dir: Path, proxy_credentials: tuple[str, str]) -> Iterator[TokenIssuer]:
    """Token server granting anonymous pull; proxyuser gets pull+push (and catalog)."""
    user, password = proxy_credentials
    with TokenIssuer(
        session_dir / "issuer-public",
        users={user: password},
        anonymous_pull=True,
        service="public-registry",
    ) as issuer:
        yield issuer


@pytest.fixture(scope="session")
def token_registry(session_dir: Path, token_issuer: TokenIssuer) -> Iterator[RegistryServer]:
    """Registry with token auth from ``token_issuer`` (anonymous pull allowed)."""
    yield from _run_registry(
        RegistryServer(
            auth="token", token_issuer=token_issuer, directory=session_dir / "registry-token"
        )
    )


@pytest.fixture(scope="session")
def private_token_issuer(
    session_dir: Path, proxy_credentials: tuple[str, str]
) -> Iterator[TokenIssuer]:
    """Token server refusing anonymous access; proxyuser gets pull+push (and catalog)."""
    user, password = proxy_credentials
    with TokenIssuer(
        session_dir / "issuer-private",
        users={user: password},
        anonymous_pull=False,
        service="private-registry",
    ) as issuer:
        yield issuer


@pytest.fixture(scope="session")
def private_token_registry(
    session_dir: Path, private_token_issuer: TokenIssuer
) -> Iterator[RegistryServer]:
    """Registry with token auth from ``private_token_issuer`` (no anonymous access)."""
    yield from _run_registry(
        RegistryServer(
            auth="token",
            token_issuer=private_token_issuer,
            directory=session_dir / "registry-private-token",
        )
    )


@pytest.fixture(scope="session")
def tls_registry(session_dir: Path, tls_files: TLSFiles) -> Iterator[RegistryServer]:
    """Anonymous registry over HTTPS with a certificate from the test CA (``tls_files``)."""
    yield from _run_registry(RegistryServer(tls=tls_files, directory=session_dir / "registry-tls"))


# -- seeded registries ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def standard_images(session_dir: Path) -> StandardImages:
    """The standard OCI layouts (app, multi, big, many), built once per session."""
    return build_standard_images(session_dir / "layouts")


@pytest.fixture(scope="session")
def seeded_registry(registry: RegistryServer, standard_images: StandardImages) -> SeededRegistry:
    """``registry`` holding app:v1, team/app:v1, multi:v1 (index), big:v1, many (300 tags)."""
    return seed_registry(registry, standard_images)


@pytest.fixture(scope="session")
def prefixed_registry(registry: RegistryServer, standard_images: StandardImages) -> SeededRegistry:
    """The anonymous registry with the standard images under ``proj/`` as well."""
    return seed_registry(registry, standard_images, prefix="proj")


@pytest.fixture(scope="session")
def seeded_htpasswd_registry(
    htpasswd_registry: RegistryServer, standard_images: StandardImages
) -> SeededRegistry:
    return seed_registry(htpasswd_registry, standard_images)


@pytest.fixture(scope="session")
def seeded_token_registry(
    token_registry: RegistryServer, token_issuer: TokenIssuer, standard_images: StandardImages
) -> SeededRegistry:
    seeded = seed_registry(token_registry, standard_images)
    token_issuer.clear()
    return seeded


@pytest.fixture(scope="session")
def seeded_private_token_registry(
    private_token_registry: RegistryServer,
    private_token_issuer: TokenIssuer,
    standard_images: StandardImages,
) -> SeededRegistry:
    seeded = seed_registry(private_token_registry, standard_images)
    private_token_issuer.clear()
    return seeded


@pytest.fixture(scope="session")
def seeded_tls_registry(
    tls_registry: RegistryServer, standard_images: StandardImages
) -> SeededRegistry:
    return seed_registry(tls_registry, standard_images)


# -- the proxy -------------------------------------------------------------------------------

ProxyFactory = Callable[..., RegproxyProcess]


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[ProxyFactory]:
    """``start_proxy(args, env=None, **kw) -> RegproxyProcess`` started; all stopped at teardown.

    On test failure the proxy output is printed (pytest shows it with the failure).
    """
    started: list[RegproxyProcess] = []

    def start(
        args: list[str], env: dict[str, str] | None = None, **kwargs: object
    ) -> RegproxyProcess:
        kwargs.setdefault("directory", tmp_path / f"proxy{len(started)}")
        process = RegproxyProcess(args, env, **kwargs)  # type: ignore[arg-type]
        started.append(process)
        return process.start()

    try:
        yield start
    finally:
        for process in started:
            process.stop()
            log = process.log_text()
            if log:
                print(f"--- regproxy {process.argv} output ---\n{log}")


# -- the standard images under the "proj/" prefix, as regproxy serves them -----------------


@pytest.fixture(scope="session")
def prefixed_token_registry(
    token_registry: RegistryServer, token_issuer: TokenIssuer, standard_images: StandardImages
) -> SeededRegistry:
    seeded = seed_registry(token_registry, standard_images, prefix="proj")
    token_issuer.clear()
    return seeded


@pytest.fixture(scope="session")
def prefixed_private_token_registry(
    private_token_registry: RegistryServer,
    private_token_issuer: TokenIssuer,
    standard_images: StandardImages,
) -> SeededRegistry:
    seeded = seed_registry(private_token_registry, standard_images, prefix="proj")
    private_token_issuer.clear()
    return seeded


@pytest.fixture(scope="session")
def prefixed_htpasswd_registry(
    htpasswd_registry: RegistryServer, standard_images: StandardImages
) -> SeededRegistry:
    return seed_registry(htpasswd_registry, standard_images, prefix="proj")


@pytest.fixture(scope="session")
def prefixed_tls_registry(
    tls_registry: RegistryServer, standard_images: StandardImages
) -> SeededRegistry:
    return seed_registry(tls_registry, standard_images, prefix="proj")


# -- object storage (issue 19) -------------------------------------------------------------------


@pytest.fixture(scope="session")
def rgw() -> Iterator[RGWServer]:
    """A Ceph RGW (S3) on loopback for the session (~13 s to start); each test takes a bucket
    of its own (``rgw.new_bucket()``)."""
    require_tools(rgw_missing_programs(), "Ceph RGW")
    with RGWServer() as server:
        yield server
