"""The few small JSON bodies the proxy must rewrite, and a bounded reader for them.

Blobs and manifests are never read here: only tags/list, _catalog and error bodies, which
name repositories and so would leak the upstream prefix. Their size is capped.
"""

from __future__ import annotations

import json
import re
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


class Discard(Protocol):
    """Reads a body nobody needs, so the pooled connection can be reused."""


class Abandon(Protocol):
    """Stops a body transfer at once: the connection is closed, not reused."""

    def connectionMade(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


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

    def cancel(_: Deferred[bytes]) -> None:
        # The client left: stop the transfer rather than read on for nobody.
        if collector.transport is not None:
            collector.transport.stopProducing()  # type: ignore[attr-defined]

    done: Deferred[bytes] = Deferred(cancel)
    collector = _Collector(limit, done, clock, idle_timeout)
    response.deliverBody(collector)
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


def rewrite_catalog(
    body: bytes,
    client_name: Callable[[str], str | None],
    shown: Callable[[str], str | None] | None = None,
) -> tuple[bytes, bool]:
    """Keep the repositories under the prefix, without it.

    ``client_name`` maps an upstream name inside the prefix (None: outside it); ``shown``,
    when given, is the name the client sees, or None for one it must not (an allow-list,
    a path route's shadow). Returns the body and whether the page ran past the prefix
    (then there is no next page for the client, whatever the upstream's Link says).
    """
    document = _loads(body)
    if not isinstance(document, dict) or not isinstance(document.get("repositories"), list):
        return body, False
    names = []
    ran_past = False
    last_hidden = False
    for name in document["repositories"]:
        mapped = client_name(name) if isinstance(name, str) else None
        if mapped is None:
            # The proxy starts listing just before the prefix, so a stranger comes after it.
            ran_past = True
            continue
        visible = shown(name) if shown is not None else mapped
        last_hidden = visible is None
        if visible is not None:
            names.append(visible)
    document["repositories"] = names
    # The next page's cursor is the page's last name: one the client may not see must not
    # be named in the Link. Continuing from the last visible name lists the hidden ones
    # again (and hides them again); a page with nothing visible ends the listing.
    if last_hidden and not names:
        ran_past = True
    return _dumps(document), ran_past


def catalog_names(body: bytes) -> list[str]:
    document = _loads(body)
    names = document.get("repositories") if isinstance(document, dict) else None
    return [name for name in names if isinstance(name, str)] if isinstance(names, list) else []


WITHHELD = "<upstream>"


def prefix_scrubber(prefix: str, names: tuple[str, str] | None) -> Callable[[str], str] | None:
    """A text filter that keeps the upstream prefix out of error messages.

    ``names`` maps the upstream repository name to the client's. Upstreams also name the
    prefix's parts on their own ("Permission denied on resource project my-project"),
    so every component is withheld too, except inside the client's own repository name.
    None when there is nothing to hide (no prefix, and no name that differs).
    """
    if names is not None and names[0] == names[1]:
        names = None
    if not prefix and names is None:
        return None
    components = sorted({part for part in prefix.split("/") if part}, key=len, reverse=True)
    # Whole tokens only: the component "proj" must not eat into the word "project".
    pattern = (
        re.compile(
            r"(?<![A-Za-z0-9_.-])(?:"
            + "|".join(re.escape(part) for part in components)
            + r")(?![A-Za-z0-9_.-])"
        )
        if components
        else None
    )

    def withhold(text: str) -> str:
        return pattern.sub(WITHHELD, text) if pattern is not None else text

    def scrub(text: str) -> str:
        if names is not None:
            text = text.replace(names[0], names[1])
        if prefix:
            text = text.replace(prefix + "/", "")
        if names is None or not names[1]:
            return withhold(text)
        return names[1].join(withhold(part) for part in text.split(names[1]))

    return scrub


def rewrite_errors(body: bytes, replace: Callable[[str], str], any_json: bool = False) -> bytes:
    """Apply ``replace`` to every string of an OCI error body (of any JSON document with
    ``any_json``, as token services answer in their own shapes); others stay as they are."""
    document = _loads(body)
    if not isinstance(document, dict) or not (any_json or "errors" in document):
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
