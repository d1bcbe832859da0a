"""Rate limits end to end: manifest GETs per client address counted exactly across the
``--workers`` of one proxy (their shared file) and across two proxies sharing one real
Redis; the request beyond the count gets ``429 TOOMANYREQUESTS`` with ``Retry-After``, the
ones before carry ``RateLimit-Limit``/``RateLimit-Remaining``; HEAD and blob GETs are not
counted. When Redis stops, requests are still answered (counted per process) and the
outage is logged once, its end once.

Requests are sent over connections each held by a known worker (found through /proc, as
tests/integration/test_workers.py does), alternating, so both workers count for certain.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.images import OCI_MANIFEST, push
from tests.support.proxy import RegproxyProcess
from tests.support.redis import RedisServer
from tests.support.registry import RegistryServer, write_htpasswd
from tests.support.seed import StandardImages
from tests.support.waiting import eventually

from .test_workers import children, socket_owner, start_workers

NAME = "limited/app"
WINDOW = 21600
PASSWORD = "limits-redis-Secret-9"

AUTH = """\
[auth]
token_key = "{key}"

"""
# With [auth], anonymous clients must be let in by the rules.
OPEN = 'pull = ["anonymous"]\n'

ROUTES = """\
[limits]
anonymous = "{limit}/6h"
{redis}
[[routes]]
name = "own"
upstream = "{upstream}"
"""


@pytest.fixture(scope="module")
def image(registry: RegistryServer, standard_images: StandardImages) -> tuple[str, str]:
    """(manifest digest, a layer's digest) of NAME:v1 in the registry."""
    push(standard_images.layout, "app", f"{registry.host_port}/{NAME}:v1")
    app = standard_images.app
    return app.digest, app.layers[0].digest


def token_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def routes(
    directory: Path, upstream: str, limit: int, *, redis: str | None = None, auth: bool = False
) -> Path:
    text = ROUTES.format(
        limit=limit, upstream=upstream, redis=f'redis = "{redis}"\n' if redis else ""
    )
    if auth:
        text = AUTH.format(key=token_key(directory / "token-key.pem")) + text + OPEN
    path = directory / "routes.toml"
    path.write_text(text)
    return path


class Answer:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def code(self) -> str:
        return str(json.loads(self.body)["errors"][0]["code"])


def ask(
    connection: http.client.HTTPConnection, method: str, path: str, token: str | None = None
) -> Answer:
    headers = {"Accept": OCI_MANIFEST}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    connection.request(method, path, headers=headers)
    return Answer(connection.getresponse())


def connection_to_each_worker(port: int, workers: list[int]) -> list[http.client.HTTPConnection]:
    """A kept-alive connection served by each worker (the kernel does not spread a burst of
    connections between workers sharing a socket: each is opened alone, and one that lands
    on a worker already held is closed)."""
    held: dict[int, socket.socket] = {}
    for _ in range(200):
        if len(held) == len(workers):
            break
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        owner = eventually(lambda c=client: socket_owner(port, c, workers), timeout=10)
        if owner in held:
            client.close()
        else:
            held[owner] = client
    assert len(held) == len(workers), "connections did not reach every worker"
    connections = []
    for client in held.values():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.sock = client
        connections.append(connection)
    return connections


def fresh(proxy: RegproxyProcess) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)


def assert_counted(answer: Answer, limit: int, remaining: int) -> None:
    assert answer.status == 200, answer.body
    assert answer.header("RateLimit-Limit") == f"{limit};w={WINDOW}"
    assert answer.header("RateLimit-Remaining") == f"{remaining};w={WINDOW}"


def assert_refused(answer: Answer, limit: int) -> None:
    assert answer.status == 429, answer.body
    assert answer.code == "TOOMANYREQUESTS"
    retry = int(answer.header("Retry-After") or "0")
    assert 0 < retry <= WINDOW
    assert answer.header("RateLimit-Limit") == f"{limit};w={WINDOW}"
    assert answer.header("RateLimit-Remaining") == f"0;w={WINDOW}"


def manifest_gets_by_worker(proxy: RegproxyProcess) -> dict[object, int]:
    counts: dict[object, int] = {}
    for event in proxy.log_events():
        if (
            event.get("log_namespace") == "regproxy.access"
            and event.get("method") == "GET"
            and str(event.get("path", "")).startswith(f"/v2/{NAME}/manifests/")
        ):
            counts[event.get("worker")] = counts.get(event.get("worker"), 0) + 1
    return counts


def test_the_101st_manifest_get_across_two_workers_is_refused(
    start_proxy, registry: RegistryServer, image: tuple[str, str], tmp_path: Path
) -> None:
    """The issue's figure: 100 per 6 h, counted across both workers."""
    digest, layer = image
    config = routes(tmp_path, registry.url, 100, auth=True)
    proxy = start_workers(start_proxy, ["--config", str(config)])
    connections = connection_to_each_worker(proxy.port, children(proxy.pid))
    manifest = f"/v2/{NAME}/manifests/v1"
    try:
        for number in range(100):
            connection = connections[number % 2]
            if number % 10 == 0:
                # Neither HEAD nor blob GETs count, on either worker.
                assert ask(connection, "HEAD", manifest).status == 200
                assert ask(connection, "GET", f"/v2/{NAME}/blobs/{layer}").status == 200
            by = manifest if number % 3 else f"/v2/{NAME}/manifests/{digest}"
            assert_counted(ask(connection, "GET", by), 100, 99 - number)
        for connection in connections:
            assert_refused(ask(connection, "GET", manifest), 100)
            assert_refused(ask(connection, "GET", f"/v2/{NAME}/manifests/{digest}"), 100)
            # Still answered: HEAD and blobs.
            assert ask(connection, "HEAD", manifest).status == 200
            assert ask(connection, "GET", f"/v2/{NAME}/blobs/{layer}").status == 200
        new = fresh(proxy)
        assert_refused(ask(new, "GET", manifest), 100)
        new.close()
    finally:
        for connection in connections:
            connection.close()
    by_worker = eventually(
        lambda: (
            (counts := manifest_gets_by_worker(proxy)) and sum(counts.values()) == 105 and counts
        ),
        10,
        what="the access log of every manifest GET",
    )
    assert set(by_worker) == {1, 2} and min(by_worker.values()) >= 50, by_worker


def test_a_small_limit_across_workers_without_auth(
    start_proxy, registry: RegistryServer, image: tuple[str, str], tmp_path: Path
) -> None:
    """[limits] alone: every client is counted by address, across the workers."""
    config = routes(tmp_path, registry.url, 3)
    proxy = start_workers(start_proxy, ["--config", str(config)])
    connections = connection_to_each_worker(proxy.port, children(proxy.pid))
    manifest = f"/v2/{NAME}/manifests/v1"
    try:
        for number, connection in enumerate([*connections, connections[0]]):
            assert_counted(ask(connection, "GET", manifest), 3, 2 - number)
        for connection in connections:
            assert_refused(ask(connection, "GET", manifest), 3)
    finally:
        for connection in connections:
            connection.close()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis", password=PASSWORD) as server:
        yield server


def redis_warnings(proxy: RegproxyProcess) -> list[str]:
    return [m for m in proxy.log_messages() if m.startswith("rate limits: Redis at")]


def test_two_proxies_sharing_redis_hold_one_limit_and_survive_its_loss(
    start_proxy,
    redis: RedisServer,
    registry: RegistryServer,
    image: tuple[str, str],
    tmp_path: Path,
) -> None:
    config = routes(tmp_path, registry.url, 10, redis=redis.url, auth=True)
    proxies = [start_proxy(["--config", str(config)]) for _ in range(2)]
    manifest = f"/v2/{NAME}/manifests/v1"
    connections = [fresh(proxy) for proxy in proxies]
    try:
        for number in range(10):
            assert_counted(ask(connections[number % 2], "GET", manifest), 10, 9 - number)
        for connection in connections:
            assert_refused(ask(connection, "GET", manifest), 10)
            assert ask(connection, "HEAD", manifest).status == 200
        assert [redis_warnings(proxy) for proxy in proxies] == [[], []]

        redis.stop()
        # Still answered, each proxy counting on its own from nothing; logged once each.
        for _ in range(3):
            for connection in connections:
                answer = ask(connection, "GET", manifest)
                assert answer.status == 200, answer.body
        for number, proxy in enumerate(proxies):
            assert ask(connections[number], "GET", manifest).header("RateLimit-Remaining") == (
                f"6;w={WINDOW}"
            )
            [warning] = redis_warnings(proxy)
            assert f"redis://127.0.0.1:{redis.port}/0 failed" in warning, warning
            assert "counting per process until it is back" in warning, warning

        redis.start()

        def counted_in_redis_again() -> bool:
            # Each request is one more chance for the proxies' reconnections to be in use.
            for connection in connections:
                ask(connection, "GET", manifest)
            return all(any("works again" in m for m in p.log_messages()) for p in proxies)

        eventually(counted_in_redis_again, 30, interval=0.2, what="both proxies on Redis again")
        assert [len(redis_warnings(proxy)) for proxy in proxies] == [2, 2]
    finally:
        for connection in connections:
            connection.close()
    for proxy in proxies:
        proxy.stop()
        assert PASSWORD not in proxy.log_text()


def test_users_are_counted_per_principal_apart_from_their_address(
    start_proxy, registry: RegistryServer, image: tuple[str, str], tmp_path: Path
) -> None:
    """``users`` counts each principal, whatever address it comes from; the anonymous count
    of that address is another."""
    users = {"erin": "erin-Limits-Secret-5", "frank": "frank-Limits-Secret-6"}
    write_htpasswd(tmp_path / "users.htpasswd", users)
    config = routes(tmp_path, registry.url, 4, auth=True)
    config.write_text(
        config.read_text()
        .replace("[limits]\n", '[limits]\nusers = "2/1h"\n')
        .replace("[auth]\n", '[auth]\nhtpasswd = "users.htpasswd"\n')
    )
    proxy = start_proxy(["--config", str(config)])
    manifest = f"/v2/{NAME}/manifests/v1"
    connection = fresh(proxy)
    try:
        tokens = {user: token_of(connection, user, password) for user, password in users.items()}
        for user in users:
            for remaining in (1, 0):
                answer = ask(connection, "GET", manifest, tokens[user])
                assert answer.status == 200, answer.body
                assert answer.header("RateLimit-Limit") == "2;w=3600"
                assert answer.header("RateLimit-Remaining") == f"{remaining};w=3600"
            refused = ask(connection, "GET", manifest, tokens[user])
            assert refused.status == 429 and refused.code == "TOOMANYREQUESTS"
            assert 0 < int(refused.header("Retry-After") or "0") <= 3600
        # The same address without credentials has its own, untouched count.
        assert_counted(ask(connection, "GET", manifest), 4, 3)
    finally:
        connection.close()


def token_of(connection: http.client.HTTPConnection, user: str, password: str) -> str:
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    connection.request(
        "GET",
        f"/_token?scope=repository:{NAME}:pull",
        headers={"Authorization": f"Basic {basic}"},
    )
    answer = Answer(connection.getresponse())
    assert answer.status == 200, answer.body
    token: str = json.loads(answer.body)["token"]
    return token
