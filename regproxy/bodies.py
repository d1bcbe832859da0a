"""The few small JSON bodies the proxy must rewrite, and a bounded reader for them.

Blobs and manifests are never read here: only tags/list, _catalog and error bodies, which
name repositories and so would leak the upstream prefix. Their size is capped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from .errors import OCIError

LIST_BODY_LIMIT = 16 * 1024 * 1024
ERROR_BODY_LIMIT = 1024 * 1024


class _Collector(Protocol):
    def __init__(
        self, limit: int, done: Deferred[bytes], clock: IReactorTime, idle_timeout: float
    ) -> None:
        self.limit = limit
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0
        self.stalled = False
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._idle_timeout, self._stall)

    def _stall(self) -> None:
        self._timer = None
        self.stalled = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.reset(self._idle_timeout)
        self.size += len(data)
        if self.size > self.limit:
            self.parts = []
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.stalled:
            self.done.errback(OCIError("UPSTREAM_TIMEOUT", "the upstream response stalled"))
        elif self.size > self.limit:
            self.done.errback(
                OCIError("UPSTREAM_UNAVAILABLE", "upstream response is too large to rewrite")
            )
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def read_bounded(
    response: IResponse, limit: int, clock: IReactorTime, idle_timeout: float
) -> Deferred[bytes]:
    """The whole (small) body, failing past ``limit`` bytes or after ``idle_timeout`` of
    silence: an upstream that stalls must not hold a request forever."""
    done: Deferred[bytes] = Deferred()
    response.deliverBody(_Collector(limit, done, clock, idle_timeout))
    return done


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _dumps(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def rewrite_tags(body: bytes, client_name: str) -> bytes:
    document = _loads(body)
    if not isinstance(document, dict) or "name" not in document:
        return body
    document["name"] = client_name
    return _dumps(document)


def rewrite_catalog(body: bytes, client_name: Callable[[str], str | None]) -> tuple[bytes, bool]:
    """Keep the repositories under the prefix, without it.

    Returns the body and whether the page ran past the prefix (then there is no next page
    for the client, whatever the upstream's Link says).
    """
    document = _loads(body)
    if not isinstance(document, dict) or not isinstance(document.get("repositories"), list):
        return body, False
    names = []
    ran_past = False
    for name in document["repositories"]:
        mapped = client_name(name) if isinstance(name, str) else None
        if mapped is None:
            # The proxy starts listing just before the prefix, so a stranger comes after it.
            ran_past = True
            continue
        names.append(mapped)
    document["repositories"] = names
    return _dumps(document), ran_past


def rewrite_errors(body: bytes, replace: Callable[[str], str]) -> bytes:
    """Apply ``replace`` to every string of an OCI error body; other bodies stay as they are."""
    document = _loads(body)
    if not isinstance(document, dict) or "errors" not in document:
        return body

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return replace(value)
        if isinstance(value, list):
            return [walk(item) for item in value]
        if isinstance(value, dict):
            return {key: walk(item) for key, item in value.items()}
        return value

    return _dumps(walk(document))
