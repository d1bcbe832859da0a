"""The cache's answers to clients: a stored object (whole, a range, or 416) and a download in
progress read by one more client; the headers content by digest always carries."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from ..protocol.errors import error_body
from ..protocol.fetch import Answer, Body, BytesBody, RegistryRequest
from .bodies import Attach, DownloadBody, StoredBody
from .metrics import CacheMetrics
from .serve import ByteRange, Unsatisfiable, parse_range
from .store import StoredObject

STALE_WARNING = b'110 - "Response is Stale"'
BLOB_TYPE = b"application/octet-stream"
DIGEST_HEADER = b"docker-content-digest"


def unsatisfiable(headers: Headers, size: int) -> Answer:
    body = error_body("RANGE_INVALID", "the range is not satisfiable", {"size": size})
    headers.setRawHeaders(b"content-range", [b"bytes */%d" % size])
    headers.setRawHeaders(b"content-type", [b"application/json"])
    return Answer(416, headers, BytesBody(body))


def reading_answer(
    attach: Attach,
    digest: str,
    headers: Headers,
    size: int | None,
    range_header: bytes | None,
    *,
    on_use: Callable[[], None] | None = None,
) -> Answer:
    """The answer of a reader of a download: whole, a range, or 416 (``size`` known)."""
    answered = Headers()
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in (b"content-length", b"content-range"):
            answered.setRawHeaders(name, values)
    answered.setRawHeaders(DIGEST_HEADER, [digest.encode()])
    first, last, status = 0, None, 200
    length = size
    if size is not None:
        chosen = parse_range(range_header, size)
        if isinstance(chosen, Unsatisfiable):
            if on_use is not None:
                on_use()
            return unsatisfiable(answered, size)
        if isinstance(chosen, ByteRange):
            first, last, status = chosen.first, chosen.last, 206
            answered.setRawHeaders(b"content-range", [b"bytes %d-%d/%d" % (first, last, size)])
            length = chosen.length
    body = DownloadBody(attach, first, last, length, on_use=on_use)
    return Answer(status, answered, body, cache="coalesced")


def stored_answer(
    obj: StoredObject,
    digest: str,
    media_type: bytes,
    request: RegistryRequest,
    *,
    metrics: CacheMetrics,
    outcome: str,
    stale: bool = False,
    clock: IReactorTime | None = None,
    prebuilt: dict[tuple[str, bytes], Headers] | None = None,
) -> Answer:
    """A stored object as the answer to ``request``: Range and If-Range honoured against
    the digest's ETag (content by digest never changes). ``prebuilt`` keeps the headers of
    whole answers per object, built once."""
    etag = b'"' + digest.encode() + b'"'
    whole = not stale and request.header(b"range") is None
    headers = prebuilt.get((digest, media_type)) if whole and prebuilt is not None else None
    if headers is not None:
        # The same headers for every whole answer of this object (they are only read).
        return Answer(200, headers, _body(obj, 0, obj.size, metrics, clock), cache=outcome)
    headers = Headers(
        {
            b"content-type": [media_type],
            DIGEST_HEADER: [digest.encode()],
            b"etag": [etag],
            b"accept-ranges": [b"bytes"],
        }
    )
    if whole and prebuilt is not None:
        if len(prebuilt) > 10_000:
            prebuilt.clear()
        prebuilt[(digest, media_type)] = headers
        return Answer(200, headers, _body(obj, 0, obj.size, metrics, clock), cache=outcome)
    if stale:
        headers.setRawHeaders(b"warning", [STALE_WARNING])
    if_range = request.header(b"if-range")
    chosen = (
        None
        if if_range is not None and if_range.strip() != etag
        else parse_range(request.header(b"range"), obj.size)
    )
    if isinstance(chosen, Unsatisfiable):
        obj.close()
        answer = unsatisfiable(headers, obj.size)
        return Answer(answer.status, answer.headers, answer.body, cache=outcome)
    first, end, status = 0, obj.size, 200
    if chosen is not None:
        first, end, status = chosen.first, chosen.last + 1, 206
        headers.setRawHeaders(
            b"content-range", [b"bytes %d-%d/%d" % (chosen.first, chosen.last, obj.size)]
        )
    return Answer(status, headers, _body(obj, first, end, metrics, clock), cache=outcome)


def _body(
    obj: StoredObject, first: int, end: int, metrics: CacheMetrics, clock: IReactorTime | None
) -> Body:
    if obj.data is not None:
        data = obj.data[first:end] if first or end != obj.size else obj.data
        obj.close()
        metrics.count("bytes_from_cache", len(data))
        return BytesBody(data)
    return StoredBody(obj, first, end, metrics, clock)
