"""An inner fetcher the test scripts, and a consumer that collects a body: the caching
fetcher tested through the fetch interface alone (no HTTP, no resource tree)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.testing import MemoryReactorClock
from twisted.web.http_headers import Headers
from zope.interface import implementer

from regproxy.cache.download import Downloads
from regproxy.cache.fetcher import CachingFetcher
from regproxy.cache.state import Cache
from regproxy.cache.store import open_store
from regproxy.config import Route, Upstream
from regproxy.protocol.errors import OCIError
from regproxy.protocol.fetch import Answer, BytesBody, RegistryRequest
from regproxy.protocol.mount import Mount
from regproxy.protocol.reference import Kind, RegistryPath

BLOB = b"layer bytes " * 1000
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
OCI = b"application/vnd.oci.image.manifest.v1+json"
ROUTE = Route(Upstream("https", "upstream.example"))


def manifest(size: int = 0, *, media_type: bytes | None = OCI) -> bytes:
    """A manifest naming BLOB, padded with an annotation to about ``size`` bytes; without
    a ``mediaType`` field when ``media_type`` is None (only its Content-Type says it)."""
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "config": {"digest": BLOB_DIGEST, "size": len(BLOB)},
        "layers": [],
    }
    if media_type is not None:
        document["mediaType"] = media_type.decode()
    if size:
        document["annotations"] = {"padding": "x" * size}
    return json.dumps(document).encode()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@attrs.frozen
class Sent:
    """One request the cache sent through its inner fetcher."""

    method: bytes
    reference: str
    authorization: bytes | None
    whole: bool
    name: str = ""


class ScriptedFetcher:
    """The inner fetcher: each request is answered by ``answer(sent)``, a Deferred the test
    may hold and fire later, or an Answer (or an exception) at once."""

    def __init__(self, answer: Callable[[Sent], Any]) -> None:
        self.answer = answer
        self.sent: list[Sent] = []

    async def fetch(self, request: RegistryRequest) -> Answer:
        sent = Sent(
            request.method,
            request.target.reference,
            request.authorization,
            request.whole_object,
            request.target.name,
        )
        self.sent.append(sent)
        result = self.answer(sent)
        if isinstance(result, Deferred):
            result = await result
        if isinstance(result, BaseException):
            raise result
        assert isinstance(result, Answer)
        return result

    def count(self, method: bytes) -> int:
        return sum(1 for s in self.sent if s.method == method)


def ok(body: bytes, content_type: bytes = b"application/octet-stream", head: bool = False):
    headers = Headers({b"content-type": [content_type], b"docker-content-digest": [b""]})
    headers.setRawHeaders(b"docker-content-digest", [digest_of(body).encode()])
    return Answer(200, headers, None if head else BytesBody(body), upstream_status=200)


def refused(status: int = 401) -> Answer:
    headers = Headers({b"content-type": [b"application/json"]})
    return Answer(status, headers, BytesBody(OCIError("UNAUTHORIZED", "no").body()))


@implementer(IConsumer)
class Collector:
    """A consumer that takes everything at once (a client reading fast)."""

    def __init__(self) -> None:
        self.data = b""
        self.producer: IPushProducer | None = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data += data


class Harness:
    """A real store in a temporary directory, a memory clock, the caching fetcher."""

    def __init__(self, inner: ScriptedFetcher, *, holds_credentials: bool = False) -> None:
        self.clock = MemoryReactorClock()
        self.directory = tempfile.mkdtemp(prefix="regproxy-fetcher-test-")
        self.store = open_store(
            self.directory, max_size=1 << 30, fsync=False, clock=self.clock.seconds
        )
        self.cache = Cache(self.store, Downloads(self.store, clock=self.clock), clock=self.clock)
        self.inner = inner
        self.fetcher = CachingFetcher(
            self.cache, inner, holds_credentials=lambda route: holds_credentials
        )

    def close(self) -> None:
        shutil.rmtree(self.directory, True)

    def request(
        self,
        reference: str,
        *,
        kind: Kind = Kind.BLOB,
        method: bytes = b"GET",
        authorization: bytes | None = None,
        name: str = "app",
        headers: dict[bytes, list[bytes]] | None = None,
    ) -> RegistryRequest:
        sent = Headers(headers or {})
        if authorization is not None:
            sent.setRawHeaders(b"authorization", [authorization])
        target = RegistryPath(kind, name, reference)
        return RegistryRequest(
            method=method,
            route=ROUTE,
            mount=Mount(ROUTE),
            target=target,
            client_target=target,
            headers=sent,
        )

    def fetch(self, request: RegistryRequest) -> Deferred[Answer]:
        return ensureDeferred(self.fetcher.fetch(request))

    def read(self, answer: Answer) -> bytes:
        """The body of ``answer`` as a fast client reads it (all of it, or it fails)."""
        assert answer.body is not None
        collector = Collector()
        done = answer.body.deliver(collector)
        self.clock.advance(0)
        failures: list[Any] = []
        done.addErrback(failures.append)
        if failures:
            raise failures[0].value
        assert done.called, "the body did not complete"
        return collector.data
