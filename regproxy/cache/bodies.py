"""The cache's answer bodies: a stored object, a download in progress, and an upstream body
verified on the fly; plus the consumer that feeds an upstream body into a download.

Each is a :class:`~regproxy.protocol.fetch.Body`: delivered to its consumer with
backpressure, failing (never completing) when the bytes turn out wrong, so the web layer
drops the connection before the client holds a complete wrong body.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IProducer, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from ..protocol.fetch import Body
from .download import Download, DownloadReader, ReaderStopped
from .metrics import CacheMetrics, NullMetrics
from .objects import sha256_hex
from .serve import CorruptObject, object_producer
from .store import DigestMismatch, StoredObject


class CacheBodyFailed(Exception):
    """A cached body that cannot be completed; ``kind`` is what the request record says."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _as_body_failure(failure: Failure) -> Failure:
    if failure.check(ReaderStopped):
        return Failure(CacheBodyFailed("client_gone", "the client went away"))
    if failure.check(DigestMismatch):
        return Failure(CacheBodyFailed("digest_mismatch", str(failure.value)))
    if failure.check(CorruptObject):
        return Failure(CacheBodyFailed("corrupt_object", str(failure.value)))
    if failure.check(CacheBodyFailed):
        return failure
    return Failure(CacheBodyFailed(getattr(failure.value, "kind", "body"), str(failure.value)))


def _followed(source: Deferred[int], stop: Callable[[], None]) -> Deferred[int]:
    """What a body's ``deliver`` returns for a producer's ``done``: the same outcome (a
    failure as a ``CacheBodyFailed`` with its kind), and cancelling it stops the producer."""
    done: Deferred[int] = Deferred(lambda _: stop())

    def forward(result: int | Failure) -> None:
        if done.called:
            return
        if isinstance(result, Failure):
            done.errback(_as_body_failure(result))
        else:
            done.callback(result)

    source.addBoth(forward)
    return done


class StoredBody:
    """Bytes ``[first, end)`` of a stored object: verified as they go when this process
    has not hashed the object yet, else ``sendfile`` on plain TCP."""

    def __init__(
        self,
        obj: StoredObject,
        first: int,
        end: int,
        metrics: CacheMetrics | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.obj = obj
        self.first = first
        self.end = end
        self.length = end - first
        self._metrics: CacheMetrics = metrics if metrics is not None else NullMetrics()
        self._clock = clock

    def deliver(self, consumer: IConsumer) -> Deferred[int]:
        request: Any = consumer
        producer = object_producer(
            request, self.obj, self.first, self.end, metrics=self._metrics, clock=self._clock
        )
        done = _followed(producer.done, producer.stopProducing)

        def counted(result: object) -> object:
            self._metrics.count("bytes_from_cache", producer.sent)
            return result

        producer.done.addBoth(counted)
        producer.start()
        return done

    def discard(self) -> None:
        self.obj.close()


Attach = Callable[[IConsumer, int, "int | None"], DownloadReader]
"""Attaches a reader of bytes first..last to a download (this process's or another's)."""


class DownloadBody:
    """Bytes ``first``..``last`` of a download, read as they arrive and verified."""

    def __init__(
        self,
        attach: Attach,
        first: int,
        last: int | None,
        length: int | None,
        on_use: Callable[[], None] | None = None,
    ) -> None:
        self.attach = attach
        self.first = first
        self.last = last
        self.length = length
        # The leader's body starts the upstream's flow once it is attached (or discarded),
        # so the download cannot end before its first reader reads it.
        self._on_use = on_use

    def _used(self) -> None:
        on_use, self._on_use = self._on_use, None
        if on_use is not None:
            on_use()

    def deliver(self, consumer: IConsumer) -> Deferred[int]:
        reader = self.attach(consumer, self.first, self.last)
        self._used()
        return _followed(reader.done, reader.stopProducing)

    def discard(self) -> None:
        self._used()


@implementer(IConsumer)
class DownloadFeed:
    """The consumer an upstream body is delivered into: its bytes go into a download."""

    def __init__(self, download: Download) -> None:
        self.download = download
        self.producer: IProducer | None = None

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.producer = producer
        download = self.download
        download.stop_upstream = producer.stopProducing
        # A download that lost its store feeds readers from memory: it pauses the upstream
        # while any of them is behind.
        if isinstance(producer, IPushProducer) or hasattr(producer, "pauseProducing"):
            push: Any = producer
            download.pause_upstream = push.pauseProducing
            download.resume_upstream = push.resumeProducing
            if download.upstream_paused:
                push.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.download.stop_upstream = None
        self.download.pause_upstream = self.download.resume_upstream = None

    def write(self, data: bytes) -> None:
        self.download.write(data)


@implementer(IConsumer)
class _HoldBack:
    """Between a body and its consumer: hashes every byte and holds the last chunk back
    until the whole body hashed to its digest."""

    def __init__(self, consumer: IConsumer, hex_: str) -> None:
        self.consumer = consumer
        self.hex = hex_
        self.hash = hashlib.sha256()
        self.held = b""
        self.sent = 0

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        if self.held:
            self.consumer.write(self.held)
            self.sent += len(self.held)
        self.held = data

    def release(self) -> int:
        if self.hash.hexdigest() != self.hex:
            raise DigestMismatch(f"sha256:{self.hex}")
        if self.held:
            self.consumer.write(self.held)
            self.sent += len(self.held)
            self.held = b""
        return self.sent


class VerifyingBody:
    """An upstream body of content by digest passed through without a store: still
    verified on the fly, its last bytes held back until the digest matched."""

    def __init__(self, inner: Body, digest: str) -> None:
        self.inner = inner
        self.hex = sha256_hex(digest)
        self.length = inner.length

    def deliver(self, consumer: IConsumer) -> Deferred[int]:
        hold = _HoldBack(consumer, self.hex)
        inner = self.inner.deliver(hold)
        done: Deferred[int] = Deferred(lambda _: inner.cancel())

        def ended(result: int | Failure) -> None:
            if done.called:
                return
            if isinstance(result, Failure):
                done.errback(_as_body_failure(result))
                return
            try:
                sent = hold.release()
            except DigestMismatch as mismatch:
                done.errback(_as_body_failure(Failure(mismatch)))
                return
            done.callback(sent)

        inner.addBoth(ended)
        return done

    def discard(self) -> None:
        self.inner.discard()
