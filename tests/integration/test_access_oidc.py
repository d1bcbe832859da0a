"""Workload identity end to end: a proxy with ``[[auth.oidc]]`` trusting a real HTTPS issuer
on loopback (tests/support/oidc_issuer.py, its certificate from the test CA named by ``ca``),
and skopeo logging in with the issuer's JWT as its password.

The rules admit ``github:repo:acme/a:*`` to one repository: that subject pulls it (digests
checked) and is refused another; JWTs that are expired, for another audience, from another
issuer, signed by an unknown key, unsigned (``alg: none``) or HMAC-signed with the issuer's
public key are refused at ``/_token``; and after a key rotation at the issuer, a token
signed by the new key is accepted once the proxy's minute between key refreshes has passed
(the proxy runs on a clock the test moves: tests/support/shifted_clock.py).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from regproxy.access._issuer import MIN_CACHE
from tests.support.images import OCI_MANIFEST, push, skopeo_copy, verify_layout
from tests.support.oidc_issuer import AUDIENCE, BAD_KINDS, OIDCIssuer
from tests.support.proxy import RegproxyProcess
from tests.support.registry import RegistryServer
from tests.support.seed import StandardImages
from tests.support.shifted_clock import ShiftedProxy
from tests.support.tls import TLSFiles

ALLOWED = "oidc-a/app"
OTHER = "oidc-b/app"
SUBJECT_A = "repo:acme/a:ref:refs/heads/main"
# A near miss of the rule's glob "repo:acme/a:*": another repository of the same owner.
SUBJECT_APP = "repo:acme/app:ref:refs/heads/main"
SUBJECT_B = "repo:acme/b:ref:refs/heads/main"

ROUTES = """\
[auth]
token_ttl = 120

[[auth.oidc]]
name = "github"
issuer = "{issuer}"
audience = "{audience}"
ca = "{ca}"

[[routes]]
name = "own"
upstream = "{upstream}"
  [[routes.access]]
  repos = ["oidc-a/**"]
  pull = ["github:repo:acme/a:*"]
  [[routes.access]]
  repos = ["oidc-b/**"]
  pull = ["github:repo:acme/b:*"]
"""


@pytest.fixture(scope="module")
def digest(registry: RegistryServer, standard_images: StandardImages) -> str:
    for name in (ALLOWED, OTHER):
        push(standard_images.layout, "app", f"{registry.host_port}/{name}:v1")
    return standard_images.app.digest


def routes_file(directory: Path, issuer: OIDCIssuer, tls: TLSFiles, upstream: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    routes = directory / "routes.toml"
    routes.write_text(
        ROUTES.format(issuer=issuer.issuer, audience=AUDIENCE, ca=tls.ca_cert, upstream=upstream)
    )
    return routes


@pytest.fixture(scope="module")
def issuer(tls_files: TLSFiles) -> Iterator[OIDCIssuer]:
    with OIDCIssuer(tls_files) as started:
        yield started


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory,
    issuer: OIDCIssuer,
    tls_files: TLSFiles,
    registry: RegistryServer,
    digest: str,
) -> Iterator[RegproxyProcess]:
    directory = tmp_path_factory.mktemp("oidc-proxy")
    routes = routes_file(directory, issuer, tls_files, registry.url)
    process = RegproxyProcess(["--config", str(routes)], directory=directory / "proc")
    try:
        yield process.start()
    finally:
        process.stop()
        print(f"--- regproxy output ---\n{process.log_text()}")


def token_request(proxy: RegproxyProcess, user: str, password: str, repository: str) -> int:
    """The status of a GET /_token with Basic credentials for one repository's pull scope."""
    query = urllib.parse.urlencode(
        {"service": proxy.host_port, "scope": f"repository:{repository}:pull"}
    )
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(
        f"{proxy.url}/_token?{query}", headers={"Authorization": f"Basic {credentials}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def token_for(proxy: RegproxyProcess, jwt: str, repository: str) -> dict[str, object]:
    query = urllib.parse.urlencode(
        {"service": proxy.host_port, "scope": f"repository:{repository}:pull"}
    )
    credentials = base64.b64encode(f"github:{jwt}".encode()).decode()
    request = urllib.request.Request(
        f"{proxy.url}/_token?{query}", headers={"Authorization": f"Basic {credentials}"}
    )
    with urllib.request.urlopen(request, timeout=20) as answer:
        document: dict[str, object] = json.loads(answer.read())
    return document


def manifest_status(proxy: RegproxyProcess, token: str, repository: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"{proxy.url}/v2/{repository}/manifests/v1",
        headers={"Authorization": f"Bearer {token}", "Accept": OCI_MANIFEST},
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            return int(answer.status), answer.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


def claim_of(token: str, name: str) -> object:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))[name]


def access_users(proxy: RegproxyProcess, repository: str) -> set[object]:
    return {
        event.get("user")
        for event in proxy.log_events()
        if event.get("log_namespace") == "regproxy.access"
        and str(event.get("path", "")).startswith(f"/v2/{repository}/")
    }


def test_skopeo_pulls_with_a_workload_jwt_as_password(
    proxy: RegproxyProcess, issuer: OIDCIssuer, digest: str, tmp_path: Path
) -> None:
    jwt = issuer.mint.mint(sub=SUBJECT_A)
    copied = skopeo_copy(f"{proxy.host_port}/{ALLOWED}:v1", tmp_path / "a", creds=("github", jwt))
    assert copied.digest == digest
    verify_layout(tmp_path / "a", digest)
    assert f"github:{SUBJECT_A}" in access_users(proxy, ALLOWED)
    # Verified against the issuer's documents, fetched over TLS trusting the route's ca.
    assert issuer.discovery_count >= 1 and issuer.jwks_count >= 1
    assert jwt not in proxy.log_text()


def test_the_subject_opens_no_other_repository(
    proxy: RegproxyProcess, issuer: OIDCIssuer, tmp_path: Path
) -> None:
    jwt = issuer.mint.mint(sub=SUBJECT_A)
    refused = skopeo_copy(
        f"{proxy.host_port}/{OTHER}:v1", tmp_path / "b", creds=("github", jwt), check=False
    )
    assert not refused.ok
    assert "denied: access to this repository is denied" in refused.stderr, refused.stderr
    # The same, step by step: the token service grants nothing for that repository, and
    # the manifest GET with that token is refused with 403 DENIED, not a challenge.
    token = token_for(proxy, jwt, OTHER)["token"]
    assert isinstance(token, str)
    status, body = manifest_status(proxy, token, OTHER)
    assert status == 403, body
    assert json.loads(body)["errors"][0]["code"] == "DENIED"
    # And the token for the admitted repository opens that one only.
    good = token_for(proxy, jwt, ALLOWED)["token"]
    assert isinstance(good, str)
    assert manifest_status(proxy, good, ALLOWED)[0] == 200
    assert manifest_status(proxy, good, OTHER)[0] == 403
    # The access log names the principal refused, as it does the one admitted.
    assert f"github:{SUBJECT_A}" in access_users(proxy, OTHER)


def test_the_subject_glob_is_not_a_prefix(
    proxy: RegproxyProcess, issuer: OIDCIssuer, tmp_path: Path
) -> None:
    """``repo:acme/a:*`` does not admit ``repo:acme/app:...``."""
    jwt = issuer.mint.mint(sub=SUBJECT_APP)
    refused = skopeo_copy(
        f"{proxy.host_port}/{ALLOWED}:v1", tmp_path / "a", creds=("github", jwt), check=False
    )
    assert not refused.ok
    assert "denied: access to this repository is denied" in refused.stderr, refused.stderr
    # B's subject pulls B: the rules, not the JWT, decide the repository.
    jwt_b = issuer.mint.mint(sub=SUBJECT_B)
    assert skopeo_copy(f"{proxy.host_port}/{OTHER}:v1", tmp_path / "b", creds=("github", jwt_b))


@pytest.mark.parametrize("kind", sorted(set(BAD_KINDS)))
def test_bad_jwts_are_refused_at_the_token_service(
    proxy: RegproxyProcess, issuer: OIDCIssuer, kind: str
) -> None:
    # Keys fetched first: the unknown key is unknown to an issuer the proxy has read.
    assert token_request(proxy, "github", issuer.mint.mint(sub=SUBJECT_A), ALLOWED) == 200
    fetched = issuer.jwks_count
    bad = issuer.mint.bad(kind)
    assert token_request(proxy, "github", bad, ALLOWED) == 401
    # A made-up key id does not make the proxy ask the issuer again (at most once a minute).
    assert issuer.jwks_count == fetched
    assert bad not in proxy.log_text()
    # The good token still works after the refusal.
    assert token_request(proxy, "github", issuer.mint.mint(sub=SUBJECT_A), ALLOWED) == 200


def test_a_jwt_for_another_provider_name_is_refused(
    proxy: RegproxyProcess, issuer: OIDCIssuer
) -> None:
    jwt = issuer.mint.mint(sub=SUBJECT_A)
    assert token_request(proxy, "gitlab", jwt, ALLOWED) == 401


@pytest.fixture
def shifted_proxy(
    tmp_path: Path, tls_files: TLSFiles, registry: RegistryServer, digest: str
) -> Iterator[tuple[ShiftedProxy, OIDCIssuer]]:
    """A proxy of its own on a clock the test moves, with an issuer of its own (rotated)."""
    with OIDCIssuer(tls_files) as issuer:
        routes = routes_file(tmp_path, issuer, tls_files, registry.url)
        process = ShiftedProxy(["--config", str(routes)], directory=tmp_path / "proc")
        try:
            yield process.start(), issuer
        finally:
            process.stop()
            print(f"--- regproxy output ---\n{process.log_text()}")


def test_a_key_rotation_at_the_issuer(
    shifted_proxy: tuple[ShiftedProxy, OIDCIssuer], digest: str, tmp_path: Path
) -> None:
    proxy, issuer = shifted_proxy
    mint = issuer.mint
    old = mint.key("RS256")
    assert token_request(proxy, "github", mint.mint(key=old, sub=SUBJECT_A), ALLOWED) == 200
    assert issuer.jwks_count == 1
    # The issuer rotates: a new key published, the old one retired.
    new = mint.add_key("RS256")
    mint.retire_key(old.kid)
    # Within the minute after the last fetch, an unknown key id is refused without a fetch.
    assert token_request(proxy, "github", mint.mint(key=new, sub=SUBJECT_A), ALLOWED) == 401
    assert issuer.jwks_count == 1
    proxy.advance(MIN_CACHE + 1)
    # Then the unknown key id makes the proxy fetch the keys again, and the new key pulls.
    jwt = mint.mint(key=new, sub=SUBJECT_A)
    copied = skopeo_copy(f"{proxy.host_port}/{ALLOWED}:v1", tmp_path / "a", creds=("github", jwt))
    assert copied.digest == digest
    assert issuer.jwks_count == 2
    # The retired key is gone from the proxy's keys too.
    retired = mint.mint(key=old, sub=SUBJECT_A)
    assert token_request(proxy, "github", retired, ALLOWED) == 401
    assert issuer.jwks_count == 2
    assert "key refresh failed" not in proxy.log_text()


def test_check_accepts_the_oidc_configuration(
    tmp_path: Path, issuer: OIDCIssuer, tls_files: TLSFiles, registry: RegistryServer
) -> None:
    """``--check`` validates [[auth.oidc]] and rules naming its principals."""
    routes = routes_file(tmp_path, issuer, tls_files, registry.url)
    checked = subprocess.run(
        [*RegproxyProcess([]).argv[:3], "regproxy", "--config", str(routes), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text(routes.read_text().replace("github:repo:acme/b:*", "gitlab:x"))
    checked = subprocess.run(
        [*RegproxyProcess([]).argv[:3], "regproxy", "--config", str(broken), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        check=False,
    )
    assert checked.returncode == 1
    assert 'route "own"' in checked.stderr and "gitlab" in checked.stderr, checked.stderr
