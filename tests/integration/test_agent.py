"""regproxy's own agent against a real distribution registry on loopback (plain and TLS):
bodies arrive whole and verified, connections are reused, and a registry that went away
and came back is reached again on a new connection."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import URI, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from bench.seed import upload_blob
from regproxy.upstream._pool import PooledAgent
from regproxy.upstream._tls import tls_context
from regproxy.upstream.treq_client import CachedEndpoints
from tests.support.registry import RegistryServer, registry_binary
from tests.support.tls import make_ca_and_cert
from tests.support.tools import require_tools


@implementer(IStreamClientEndpoint)
class CountingEndpoint:
    def __init__(self, inner: IStreamClientEndpoint, counter: list[int]) -> None:
        self.inner = inner
        self.counter = counter

    def connect(self, factory: Any) -> Deferred[Any]:
        self.counter[0] += 1
        return self.inner.connect(factory)


@implementer(IAgentEndpointFactory)
class CountingEndpoints:
    """Counts the connections the agent opens."""

    def __init__(self, inner: IAgentEndpointFactory) -> None:
        self.inner = inner
        self.connections = [0]

    def endpointForURI(self, uri: URI) -> CountingEndpoint:
        return CountingEndpoint(self.inner.endpointForURI(uri), self.connections)


class Digest(Protocol):
    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0
        self.done: Deferred[str] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if reason.check(ResponseDone):
            self.done.callback("sha256:" + self.hash.hexdigest())
        else:
            self.done.errback(reason)


async def body_digest(response: IResponse) -> str:
    digest = Digest()
    response.deliverBody(digest)
    return await digest.done


class AgentAgainstARegistry(TestCase):
    tls = False
    timeout = 120

    def setUp(self) -> None:
        require_tools([] if registry_binary() else ["docker-registry"], "integration tools")
        self.directory = Path(tempfile.mkdtemp(prefix="regproxy-agent-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.files = make_ca_and_cert(self.directory / "tls") if self.tls else None
        self.registry = self.start_registry()
        self.blob = os.urandom(3 * 1024 * 1024 + 17)
        self.digest = upload_blob(
            self.registry.url,
            "agent/test",
            self.blob,
            cafile=self.files.ca_cert if self.files else None,
        )
        ca = str(self.files.ca_cert) if self.files else None
        self.endpoints = CountingEndpoints(CachedEndpoints(reactor, tls_context(ca), 5.0))
        self.agent = PooledAgent(reactor, self.endpoints, idle_timeout=60)
        self.addCleanup(self.agent.closeCachedConnections)

    def start_registry(self, port: int | None = None) -> RegistryServer:
        registry = RegistryServer(tls=self.files, directory=self.directory / "registry")
        if port is not None:
            registry.port = port
        registry.start()
        self.addCleanup(registry.stop)
        return registry

    def url(self, path: str) -> bytes:
        return (self.registry.url + path).encode("ascii")

    async def get(self, path: str, method: bytes = b"GET") -> IResponse:
        response: IResponse = await self.agent.request(method, self.url(path), Headers())
        return response

    async def test_blobs_arrive_whole_over_one_reused_connection(self) -> None:
        path = f"/v2/agent/test/blobs/{self.digest}"
        for _ in range(3):
            response = await self.get(path)
            self.assertEqual(response.code, 200)
            self.assertEqual(response.length, len(self.blob))
            self.assertEqual(await body_digest(response), self.digest)
        head = await self.get(path, b"HEAD")
        self.assertEqual(head.code, 200)
        self.assertEqual(await body_digest(head), "sha256:" + hashlib.sha256(b"").hexdigest())
        missing = await self.get("/v2/agent/test/blobs/sha256:" + "0" * 64)
        self.assertEqual(missing.code, 404)
        await body_digest(missing)
        version = await self.get("/v2/")
        self.assertEqual(version.code, 200)
        await body_digest(version)
        self.assertEqual(self.endpoints.connections[0], 1)
        self.assertEqual(self.agent.idle_count(), 1)

    async def test_concurrent_requests_use_a_connection_each_and_all_are_pooled(self) -> None:
        path = f"/v2/agent/test/blobs/{self.digest}"
        # Four requests at once, none of whose bodies has been read yet.
        sending = [self.agent.request(b"GET", self.url(path), Headers()) for _ in range(4)]
        responses = [await d for d in sending]
        digests = [await body_digest(r) for r in responses]
        self.assertEqual(digests, [self.digest] * 4)
        self.assertEqual(self.endpoints.connections[0], 4)
        self.assertEqual(self.agent.idle_count(), 4)

    async def test_a_registry_that_restarted_is_reached_on_a_new_connection(self) -> None:
        version = await self.get("/v2/")
        await body_digest(version)
        self.assertEqual(self.agent.idle_count(), 1)
        port = self.registry.port
        self.registry.stop()
        self.registry = self.start_registry(port)
        response = await self.get(f"/v2/agent/test/blobs/{self.digest}")
        self.assertEqual(await body_digest(response), self.digest)
        self.assertEqual(self.endpoints.connections[0], 2)


class AgentAgainstATLSRegistry(AgentAgainstARegistry):
    tls = True
