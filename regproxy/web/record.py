"""The one typed record of a request: what the access log line and the metrics say of it.

Created with the request (:class:`regproxy.web.site.ProxyRequest`), filled by the web layer
alone (from the route it matched and the answer it wrote), emitted once when it ends.
"""

from __future__ import annotations

import contextlib
from typing import Any

import attrs

from ..protocol.fetch import Answer


@attrs.define
class RequestRecord:
    """What one request learnt on its way."""

    route: str = ""
    endpoint: str = "other"
    upstream_status: int | None = None
    upstream_seconds: float | None = None
    # What went wrong, when something did: connect, tls, timeout, ..., client_gone.
    error_kind: str | None = None
    # With a cache: hit, miss, coalesced, stale or bypass.
    cache: str | None = None
    # With [auth]: the principal admitted (a user, <oidc name>:<subject>); None: anonymous.
    user: str | None = None

    def took(self, answer: Answer) -> None:
        """The answer being written: how it was obtained."""
        if answer.upstream_status is not None:
            self.upstream_status = answer.upstream_status
        if answer.upstream_seconds is not None:
            self.upstream_seconds = answer.upstream_seconds
        if answer.cache is not None:
            self.cache = answer.cache


def record_of(request: Any) -> RequestRecord:
    """The request's record (a request not made by the proxy's Site gets a spare one)."""
    record: RequestRecord | None = getattr(request, "record", None)
    if record is None:
        record = RequestRecord()
        with contextlib.suppress(AttributeError):
            request.record = record
    return record
