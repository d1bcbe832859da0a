"""The fetch interface's contract, one suite run against both implementations: the
upstream fetcher, and the caching fetcher around it. Whatever a client asks, both answer
alike (status, the headers that describe content, the bytes), so nothing above them can tell
a cached route from a plain one."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from regproxy.cache.download import Downloads
from regproxy.cache.fetcher import CachingFetcher
from regproxy.cache.state import Cache
from regproxy.cache.store import open_store
from regproxy.config import Route, Upstream
from regproxy.protocol.errors import OCIError
from regproxy.protocol.fetch import Answer, Fetcher, RegistryRequest
from regproxy.protocol.mount import Mount
from regproxy.protocol.reference import Kind, RegistryPath
from regproxy.upstream.auth import UpstreamAuth
from regproxy.upstream.client import UpstreamClient
from regproxy.upstream.fetcher import UpstreamFetcher
from tests.support.inmemory import Answer as Canned
from tests.support.inmemory import FailingAgent, FakeRegistry, in_memory_client

BLOB = bytes(range(256)) * 300
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
OCI = b"application/vnd.oci.image.manifest.v1+json"
ROUTE = Route(Upstream("https", "upstream.example"), prefix="proj")


@implementer(IConsumer)
class Collector:
    def __init__(self) -> None:
        self.data = b""

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.data += data


def ranged_blob(request: Any) -> Canned:
    """The blob, or the one range ``bytes=A-B`` asked for, as a registry answers."""
    headers = {b"content-type": [b"application/octet-stream"]}
    asked = request.getHeader(b"range")
    if asked is None:
        return Canned(200, headers, BLOB)
    first, last = (int(n) for n in asked.removeprefix(b"bytes=").split(b"-"))
    headers[b"content-range"] = [b"bytes %d-%d/%d" % (first, last, len(BLOB))]
    return Canned(206, headers, BLOB[first : last + 1])


class World:
    """An in-memory upstream registry, and the fetcher under test in front of it."""

    def __init__(self, kind: str, agent: Any = None) -> None:
        self.registry = FakeRegistry()
        self.registry.on(f"/v2/proj/app/blobs/{DIGEST}", ranged_blob)
        manifest = Canned(
            200,
            {b"content-type": [OCI], b"docker-content-digest": [MANIFEST_DIGEST.encode()]},
            MANIFEST,
        )
        self.registry.on("/v2/proj/app/manifests/v1", manifest)
        self.registry.on(f"/v2/proj/app/manifests/{MANIFEST_DIGEST}", manifest)
        self.agent = agent or RequestTraversalAgent(self.registry)
        self.clock = Clock()
        upstream = UpstreamClient(
            in_memory_client(self.agent), clock=self.clock, timeout=30, idle_timeout=60
        )
        plain = UpstreamFetcher(
            upstream=upstream, auth=UpstreamAuth(upstream=upstream, sources={})
        )
        self.fetcher: Fetcher = plain
        self.directory: str | None = None
        if kind == "cache":
            self.directory = tempfile.mkdtemp(prefix="regproxy-contract-")
            store = open_store(
                self.directory, max_size=1 << 30, fsync=False, clock=self.clock.seconds
            )
            cache = Cache(store, Downloads(store, clock=self.clock), clock=self.clock)
            self.fetcher = CachingFetcher(cache, plain, holds_credentials=lambda route: False)

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, True)

    def settle(self, d: Deferred[Any]) -> Any:
        for _ in range(50):
            if d.called:
                break
            flush = getattr(self.agent, "flush", None)
            if flush is not None:
                flush()
            self.clock.advance(0)
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "no answer"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def fetch(
        self, kind: Kind, reference: str, method: bytes = b"GET", **headers: bytes
    ) -> Answer:
        target = RegistryPath(kind, "app", reference)
        request = RegistryRequest(
            method=method,
            route=ROUTE,
            mount=Mount(ROUTE),
            target=target,
            client_target=target,
            headers=Headers({name.replace("_", "-").encode(): [v] for name, v in headers.items()}),
            base_url=lambda: "https://proxy.example",
        )
        answer: Answer = self.settle(ensureDeferred(self.fetcher.fetch(request)))
        return answer

    def read(self, answer: Answer) -> bytes:
        assert answer.body is not None
        collector = Collector()
        self.settle(answer.body.deliver(collector))
        return collector.data


@pytest.fixture(params=["upstream", "cache"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    made = World(request.param)
    yield made
    made.close()


@pytest.mark.parametrize("times", [1, 2])
def test_a_blob_is_its_bytes(world: World, times: int) -> None:
    for _ in range(times):  # the second time from the cache, where there is one
        answer = world.fetch(Kind.BLOB, DIGEST)
        assert answer.status == 200
        assert answer.body is not None and answer.body.length == len(BLOB)
        assert world.read(answer) == BLOB


def test_a_head_has_a_length_and_no_body_to_read(world: World) -> None:
    world.read(world.fetch(Kind.BLOB, DIGEST))
    answer = world.fetch(Kind.BLOB, DIGEST, method=b"HEAD")
    assert answer.status == 200
    length = answer.body.length if answer.body is not None else None
    header = answer.header(b"content-length")
    assert length == len(BLOB) or header == str(len(BLOB)).encode()


@pytest.mark.parametrize("reference", ["v1", MANIFEST_DIGEST])
def test_a_manifest_keeps_its_type(world: World, reference: str) -> None:
    for _ in range(2):
        answer = world.fetch(Kind.MANIFEST, reference, accept=OCI)
        assert answer.status == 200 and answer.header(b"content-type") == OCI
        assert world.read(answer) == MANIFEST


def test_a_range_is_the_bytes_asked_for(world: World) -> None:
    answer = world.fetch(Kind.BLOB, DIGEST, range=b"bytes=2-4")
    assert answer.status == 206
    assert answer.header(b"content-range") == b"bytes 2-4/%d" % len(BLOB)
    assert world.read(answer) == BLOB[2:5]


def test_what_the_upstream_lacks_is_its_oci_error(world: World) -> None:
    missing = "sha256:" + "0" * 64
    answer = world.fetch(Kind.BLOB, missing)
    assert answer.status == 404
    assert b'"errors"' in world.read(answer)


@pytest.mark.parametrize("kind", ["upstream", "cache"])
def test_an_unreachable_upstream_is_a_502(kind: str) -> None:
    from twisted.internet.error import ConnectionRefusedError

    made = World(kind, agent=FailingAgent(ConnectionRefusedError()))
    try:
        with pytest.raises(OCIError) as error:
            made.fetch(Kind.BLOB, DIGEST)
        assert error.value.status == 502
    finally:
        made.close()
