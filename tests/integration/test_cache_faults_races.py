"""The cache under races and faults, through a real registry and the proxy as a process.

Each client gets its own answer: a download shared by several clients serves them only
once the upstream said 200 to a request they are entitled to, and a refused or failed
shared request never turns into a 500 for the others. Manifests up to distribution's
limit keep their media type from the store, and a repository made private stops being
served to anonymous clients within ``--cache-public-ttl``.

Races are made deterministic by a relay in front of the registry
(:class:`~tests.support.faulty.FaultyUpstream`) that holds one client's upstream request
until the other client's request has reached the upstream.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.curl import CurlResult, curl
from tests.support.faulty import FaultyUpstream, Hold, Seen
from tests.support.images import (
    OCI_MANIFEST,
    ImageInfo,
    RegistryClient,
    build_image,
    parse_challenge,
    push,
)
from tests.support.proxy import RegproxyProcess
from tests.support.registry import RegistryServer
from tests.support.tokens import TokenIssuer
from tests.support.waiting import eventually

ADMIN = ("admin", "admin-password")
ALICE = ("alice", "alice-password")
BOB = ("bob", "bob-password")
REPOSITORY = "secret/app"
SCOPE = f"repository:{REPOSITORY}:pull"
# The proxy may take this long to hand a held request's answer on, then join its waiters.
GRACE = 0.5
OCI_ERROR_STATUSES = (401, 403, 404)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenIssuer]:
    """No anonymous access; alice may read secret/app only, bob other/app only."""
    with TokenIssuer(
        tmp_path_factory.mktemp("issuer-races"),
        users=dict([ADMIN, ALICE, BOB]),
        anonymous_pull=False,
        service="races-registry",
        repositories={ALICE[0]: [REPOSITORY], BOB[0]: ["other/app"]},
    ) as issuer:
        yield issuer


@pytest.fixture(scope="module")
def scoped(
    tmp_path_factory: pytest.TempPathFactory, issuer: TokenIssuer
) -> Iterator[RegistryServer]:
    with RegistryServer(
        auth="token", token_issuer=issuer, directory=tmp_path_factory.mktemp("registry-races")
    ) as server:
        yield server


@pytest.fixture(scope="module")
def cold_layers(scoped: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> ImageInfo:
    """secret/app:v1 with five uncompressed 1 MiB layers: one cold blob per race."""
    layout = tmp_path_factory.mktemp("races-layout")
    image = build_image(layout, layers=(1024 * 1024,) * 5, tag="v1", compress=False)
    push(layout, "v1", f"{scoped.host_port}/{REPOSITORY}:v1", creds=ADMIN)
    return image


@pytest.fixture
def relay(scoped: RegistryServer) -> Iterator[FaultyUpstream]:
    with FaultyUpstream(scoped.port) as relay:
        yield relay


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """No auth at all, its access log on (what reached it is counted there)."""
    with RegistryServer(
        directory=tmp_path_factory.mktemp("registry-public-races"),
        extra_config={"log": {"level": "info", "accesslog": {"disabled": False}}},
    ) as server:
        yield server


# -- helpers -------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def bearer(proxy_url: str, creds: tuple[str, str]) -> str:
    """An Authorization value for ``creds`` and secret/app, from the proxy's own /_token."""
    challenge = curl(proxy_url + "/v2/").header("WWW-Authenticate")
    assert challenge is not None
    _, params = parse_challenge(challenge)
    client = RegistryClient(proxy_url, creds=creds)
    return "Bearer " + client.token(params["realm"], params.get("service"), [SCOPE])


def get(url: str, authorization: str | None) -> CurlResult:
    args = ["-H", f"Authorization: {authorization}"] if authorization is not None else []
    return curl(url, *args, timeout=60, cut_ok=True)


def assert_oci_refusal(answer: CurlResult, what: str) -> None:
    assert answer.status in OCI_ERROR_STATUSES, (what, answer.status, answer.body[:300])
    codes = answer.error_codes()
    assert codes and all(isinstance(code, str) for code in codes), (what, answer.body)


def assert_whole(answer: CurlResult, digest: str, size: int, what: str) -> None:
    assert answer.status == 200, (what, answer.status, answer.body[:300])
    assert answer.complete, (what, answer.exit_code)
    assert answer.header("Content-Length") == str(size), what
    assert len(answer.body) == size, what
    assert sha256(answer.body) == digest, what


def cache_outcomes(proxy: RegproxyProcess, path: str) -> list[object]:
    return [e.get("cache") for e in proxy.log_events() if e.get("path") == path]


def server_errors(proxy: RegproxyProcess, path: str) -> list[object]:
    """The statuses of 500 or more the proxy logged for ``path``, but for 502 and 504."""
    statuses = [e.get("status") for e in proxy.log_events() if e.get("path") == path]
    return [s for s in statuses if isinstance(s, int) and s >= 500 and s not in (502, 504)]


def race(
    relay: FaultyUpstream,
    url: str,
    first: str | None,
    second: str | None,
    hold_first_until: Hold,
    second_gets: Hold | None = None,
) -> tuple[CurlResult, CurlResult]:
    """``first``'s request, held at the upstream as ``hold_first_until`` says; ``second``'s
    sent once ``first``'s GET is outstanding there (its own GETs upstream treated as
    ``second_gets`` says). Both answers."""
    path = "/" + url.split("/", 3)[3]

    def held(seen: Seen) -> Hold | None:
        if seen.method != "GET" or seen.path != path:
            return None
        if seen.authorization == first:
            return hold_first_until
        return second_gets if seen.authorization == second else None

    relay.rule = held
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        leading = pool.submit(get, url, first)
        eventually(
            lambda: relay.requests(
                lambda s: s.method == "GET" and s.path == path and s.authorization == first
            ),
            what="the first client's GET at the upstream",
        )
        joining = pool.submit(get, url, second)
        answers = leading.result(), joining.result()
    relay.rule = None
    overdue = relay.requests(lambda seen: seen.overdue)
    assert overdue == [], "the second client never reached the upstream while the first waited"
    return answers


# -- 1. an unauthorized and an authorized request race for one cold blob ------------------


def test_a_refused_request_never_fails_an_authorized_one_racing_it(
    start_proxy,
    scoped: RegistryServer,
    cold_layers: ImageInfo,
    relay: FaultyUpstream,
    tmp: Path,
) -> None:
    """The unauthorized client's GET starts the download and is answered 401 only after
    the authorized client reached the upstream (its access check) and waits on that
    download: the authorized client still gets its whole blob, the other its refusal.
    Both orders, anonymous and a credential without access to the repository."""
    proxy = start_proxy(["--upstream", relay.url, "--cache-dir", str(tmp / "cache")])
    rounds = [
        ("anonymous first", None, ALICE),
        ("bob first", BOB, ALICE),
        ("alice before anonymous", ALICE, None),
        ("alice before bob", ALICE, BOB),
    ]
    paths = []
    for (what, first_user, second_user), layer in zip(rounds, cold_layers.layers[:4], strict=True):
        # Fresh tokens each round: a credential the proxy admitted before would join the
        # download without asking the upstream, and the relay would not see it arrive.
        # bob's carries no action on secret/app.
        first, second = (
            bearer(proxy.url, user) if user is not None else None
            for user in (first_user, second_user)
        )
        path = f"/v2/{REPOSITORY}/blobs/{layer.digest}"
        paths.append(path)
        url = proxy.url + path

        def reached(seen: Seen, path: str = path, who: str | None = second) -> bool:
            return seen.path == path and seen.authorization == who

        # Let the first client's upstream answer through only once the second client's
        # own request (an access check, or its GET) has been answered there.
        hold = Hold(until=lambda reached=reached: relay.answered(reached), grace=GRACE)
        answers = race(relay, url, first, second, hold)
        authorized, unauthorized = answers if first_user == ALICE else answers[::-1]
        assert_whole(authorized, layer.digest, layer.size, what)
        assert_oci_refusal(unauthorized, what)
        assert sha256(unauthorized.body) != layer.digest
    proxy.stop()
    for path in paths:
        assert server_errors(proxy, path) == [], path


# -- 2. a joiner whose leader's upstream connection failed --------------------------------


def test_a_joiner_of_a_download_whose_upstream_connection_failed_gets_no_500(
    start_proxy,
    scoped: RegistryServer,
    cold_layers: ImageInfo,
    relay: FaultyUpstream,
    tmp: Path,
) -> None:
    """alice's GET starts the download; the relay hangs up on it (every try) once admin,
    who joins it, has been admitted. alice gets 502; admin gets 502 or, through a request
    of its own, the whole blob. Never 500."""
    layer = cold_layers.layers[len(cold_layers.layers) - 1]
    proxy = start_proxy(["--upstream", relay.url, "--cache-dir", str(tmp / "cache")])
    alice = bearer(proxy.url, ALICE)
    admin = bearer(proxy.url, ADMIN)
    path = f"/v2/{REPOSITORY}/blobs/{layer.digest}"

    def admins(seen: Seen) -> bool:
        return seen.path == path and seen.authorization == admin

    refuse = Hold(until=lambda: relay.answered(admins), grace=GRACE, refuse=True)
    leader, joiner = race(relay, proxy.url + path, alice, admin, refuse)
    # Every GET of alice's was refused (retries included): the proxy got no answer.
    alices = relay.requests(lambda s: s.path == path and s.authorization == alice)
    assert alices and all(s.refused for s in alices if s.method == "GET")
    assert relay.answered(admins)
    assert leader.status == 502, leader.body[:300]
    assert leader.error_codes() == ["UPSTREAM_UNAVAILABLE"]
    if joiner.status == 200:
        assert_whole(joiner, layer.digest, layer.size, "the joiner, on its own request")
    else:
        assert joiner.status == 502, joiner.body[:300]
        assert joiner.error_codes() == ["UPSTREAM_UNAVAILABLE"]
    proxy.stop()
    assert server_errors(proxy, path) == []


@pytest.mark.parametrize("leader", ["refused", "failed"])
def test_the_own_request_of_a_joiner_whose_leader_got_nothing_is_verified_too(
    start_proxy,
    scoped: RegistryServer,
    cold_layers: ImageInfo,
    relay: FaultyUpstream,
    tmp: Path,
    leader: str,
) -> None:
    """As above (the leader refused by the upstream, bob, or its connection failed),
    but the upstream sends the joiner's own GET wrong bytes: the joiner must never
    complete them (a cut transfer or an error, as for any download), nor get a 500."""
    layer = cold_layers.layers[4]
    proxy = start_proxy(["--upstream", relay.url, "--cache-dir", str(tmp / "cache")])
    first = bearer(proxy.url, BOB if leader == "refused" else ALICE)
    admin = bearer(proxy.url, ADMIN)
    path = f"/v2/{REPOSITORY}/blobs/{layer.digest}"

    def admins(seen: Seen) -> bool:
        return seen.path == path and seen.authorization == admin

    hold = Hold(until=lambda: relay.answered(admins), grace=GRACE, refuse=leader == "failed")
    _, joiner = race(relay, proxy.url + path, first, admin, hold, Hold(corrupt=True))
    assert joiner.status < 500 or joiner.status in (502, 504), joiner.body[:300]
    if joiner.status == 200:
        assert not joiner.complete, "a complete wrong body"
        assert len(joiner.body) < layer.size
        assert sha256(joiner.body) != layer.digest
    proxy.stop()
    assert server_errors(proxy, path) == []


# -- 3. a manifest over 1 MiB -------------------------------------------------------------


def big_manifest(image: ImageInfo, size: int) -> bytes:
    """``image``'s manifest with annotations enough to make it ``size`` bytes or more."""
    manifest = json.loads(image.manifest_bytes)
    filler = "x" * 1000
    manifest["annotations"] = {
        f"org.example.note.{n:05d}": filler for n in range(size // (len(filler) + 30) + 1)
    }
    data = json.dumps(manifest, indent=1).encode()
    assert size <= len(data) < 4 * 1024 * 1024
    return data


def access_log_lines(registry: RegistryServer, path: str) -> list[str]:
    return re.findall(rf'"(?:GET|HEAD) {re.escape(path)} ', registry.log_text())


def test_a_manifest_over_one_mib_keeps_its_media_type_and_children_from_the_store(
    start_proxy, public: RegistryServer, tmp: Path
) -> None:
    """A 1.7 MB OCI manifest, in repositories a and b: served through the cache by tag
    (a miss, then a hit), then by digest for b (from the store): always with the
    upstream's Content-Type. Served for b from the store, it says b holds its layer, so
    that layer (cached through a) is served for b with no question upstream."""
    image = build_image(tmp / "layout", layers=(20 * 1024,), tag="v1")
    for repository in ("big-a", "big-b"):
        push(tmp / "layout", "v1", f"{public.host_port}/{repository}:v1")
    data = big_manifest(image, 1_700_000)
    digest = sha256(data)
    registry = RegistryClient(public.url)
    for repository in ("big-a", "big-b"):
        put = registry.put_manifest(repository, "huge", data, OCI_MANIFEST)
        assert put.status == 201, put.body
    direct = curl(f"{public.url}/v2/big-a/manifests/huge", "-H", f"Accept: {OCI_MANIFEST}")
    assert direct.header("Content-Type") == OCI_MANIFEST

    layer = image.layers[0]
    layer_path = f"/v2/big-b/blobs/{layer.digest}"
    pushed = len(access_log_lines(public, layer_path))  # the push's own checks
    proxy = start_proxy(["--upstream", public.url, "--cache-dir", str(tmp / "cache")])
    accept = ("-H", f"Accept: {OCI_MANIFEST}")
    by_tag = proxy.url + "/v2/big-a/manifests/huge"
    for attempt in ("miss", "hit"):
        answer = curl(by_tag, *accept)
        assert answer.status == 200, (attempt, answer.body[:300])
        assert sha256(answer.body) == digest, attempt
        assert answer.header("Content-Type") == OCI_MANIFEST, attempt
        assert answer.header("Docker-Content-Digest") == digest, attempt
    stored_layer = curl(f"{proxy.url}/v2/big-a/blobs/{layer.digest}")
    assert_whole(stored_layer, layer.digest, layer.size, "the layer through big-a")
    eventually(
        lambda: "hit" in cache_outcomes(proxy, "/v2/big-a/manifests/huge"),
        what="the second manifest GET logged as a hit",
    )

    for attempt in ("first", "again"):
        answer = curl(f"{proxy.url}/v2/big-b/manifests/{digest}", *accept)
        assert answer.status == 200, (attempt, answer.body[:300])
        assert sha256(answer.body) == digest, attempt
        assert answer.header("Content-Type") == OCI_MANIFEST, attempt
    child = curl(proxy.url + layer_path)
    assert_whole(child, layer.digest, layer.size, "the layer through big-b")
    # Known to be big-b's from its manifest: no upstream question about it.
    assert len(access_log_lines(public, layer_path)) == pushed
    proxy.stop()
    assert cache_outcomes(proxy, layer_path) == ["hit"]
    assert cache_outcomes(proxy, f"/v2/big-b/manifests/{digest}") == ["hit", "hit"]


# -- 4. a repository made private ----------------------------------------------------------

PUBLIC_TTL = 2.0
# Beyond the TTL: the proxy's own time to notice, on a machine other jobs load.
TTL_MARGIN = 8.0


def test_a_repository_made_private_is_refused_to_anonymous_clients_within_the_public_ttl(
    start_proxy, tmp: Path
) -> None:
    """An anonymous pull of a public repository's blob through the cache; then the
    upstream requires credentials (restarted with htpasswd, same storage and port). Within
    --cache-public-ttl (plus a margin) an anonymous GET of the blob by digest, a cache hit
    until then, is refused."""
    user = ("owner", "owner-password")
    upstream = RegistryServer(directory=tmp / "upstream")
    with upstream:
        image = build_image(tmp / "layout", layers=(100 * 1024,), tag="v1")
        push(tmp / "layout", "v1", f"{upstream.host_port}/open/app:v1")
        layer = image.layers[0]
        proxy = start_proxy(
            [
                "--upstream",
                upstream.url,
                "--cache-dir",
                str(tmp / "cache"),
                "--cache-public-ttl",
                str(PUBLIC_TTL),
            ]
        )
        path = f"/v2/open/app/blobs/{layer.digest}"
        url = proxy.url + path
        assert_whole(curl(url), layer.digest, layer.size, "anonymous, public")
        # Stored, then served to anonymous clients from the cache (the repository is
        # remembered as public).
        eventually(
            lambda: curl(url).status == 200 and "hit" in cache_outcomes(proxy, path),
            what="an anonymous hit",
        )
        upstream.stop()
        upstream.auth = "htpasswd"
        upstream.users = dict([user])
        upstream.start()
        assert curl(upstream.url + path).status == 401

        def refused() -> CurlResult | None:
            answer = curl(url)
            if answer.status == 200:
                assert sha256(answer.body) == layer.digest
                return None
            return answer

        answer = eventually(
            refused, timeout=PUBLIC_TTL + TTL_MARGIN, what="an anonymous GET refused"
        )
        assert answer is not None
        assert_oci_refusal(answer, "anonymous, private")
        assert sha256(answer.body) != layer.digest
        # And it stays refused.
        assert_oci_refusal(curl(url), "anonymous, private, again")
        # The owner still pulls it (from the cache).
        owner = curl(url, "-u", f"{user[0]}:{user[1]}")
        assert_whole(owner, layer.digest, layer.size, "the owner, private")
        proxy.stop()
