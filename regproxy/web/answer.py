"""The one place that writes an answer to a client.

Fetchers return an :class:`~regproxy.protocol.fetch.Answer`; this module sets its status and
headers on the request, streams its body (or, for a HEAD, only says its length), finishes
the request, and drops the connection when a body cannot be completed, so a client never
takes a cut body for a whole one. What happened goes into the request's record.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.web.server import Request

from ..protocol.errors import OCIError
from ..protocol.fetch import Answer
from .record import record_of

# Statuses whose answers never carry a body (RFC 9110 6.4.1).
_NO_BODY = frozenset({204, 304})


def abort_client(request: Request) -> None:
    """Drop a client whose answer cannot be completed.

    Aborted, not closed: a closing transport would wait to flush a buffer that a stalled
    client never drains, and the request would count as in flight for as long.
    """
    transport: Any = getattr(getattr(request, "channel", None), "transport", None)
    if not request.finished and transport is not None:
        transport.abortConnection()


def failure_kind(error: BaseException) -> str:
    """What a body failure is called in the request record."""
    kind = getattr(error, "kind", None)
    return kind if isinstance(kind, str) else "body"


async def write_answer(request: Request, answer: Answer) -> None:
    """Answer ``request`` with ``answer``; returns once the last byte is with the transport.

    Raises ``CancelledError`` when the client left (its body's source is stopped) and an
    ``OCIError`` when the body broke off after the headers went out (the connection has
    been dropped by then).
    """
    record = record_of(request)
    record.took(answer)
    body = answer.body
    if request.finished or request.channel is None:
        if body is not None:
            body.discard()
        return
    request.setResponseCode(answer.status, answer.phrase)
    headers = request.responseHeaders
    for name, values in answer.headers.getAllRawHeaders():
        headers.setRawHeaders(name, values)
    if body is None:
        request.finish()
        return
    if body.length is not None and answer.status not in _NO_BODY:
        headers.setRawHeaders(b"content-length", [b"%d" % body.length])
    if request.method == b"HEAD" or answer.status in _NO_BODY:
        body.discard()
        request.finish()
        return
    delivering: Deferred[int] = body.deliver(request)
    try:
        await delivering
    except CancelledError:
        # The client left (or the proxy is stopping): nothing more goes to this connection.
        abort_client(request)
        raise
    except Exception as error:
        record.error_kind = failure_kind(error)
        abort_client(request)
        raise OCIError(
            "UPSTREAM_UNAVAILABLE", "the transfer was abandoned", kind=record.error_kind
        ) from None
    if not request.finished and request.channel is not None:
        request.finish()
