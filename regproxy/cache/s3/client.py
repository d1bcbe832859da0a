"""A small S3 client on treq: the calls the cache needs, bodies streamed, never buffered.

Each request is signed with SigV4 by ``minio.signer`` (why minio: ``settings``) and sent by
the proxy's own treq client (``upstream.treq_client``: pooled llhttp connections). Bodies of
GETs are the caller's to stream (``UpstreamBody``); what is read whole here (index records,
listings, error documents) is bounded by ``SMALL_LIMIT``.

Payloads are signed with their sha256 (``x-amz-content-sha256``), not ``UNSIGNED-PAYLOAD``:
the service then refuses a part whose bytes changed on the way, so what the cache hashed is
what the service stores, part by part.

Every request has a deadline (``timeout``): a slow or unreachable store costs that much, and
the caller falls back to the upstream. Failures to reach the store raise ``StoreUnreachable``;
answers the service gave raise ``S3Error`` with its status and code.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

import attrs
from minio import time as amz_time
from minio.credentials.credentials import Credentials
from minio.signer import presign_v4, sign_v4_s3
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from ...upstream.reading import Abandon, read_bounded
from ...upstream.treq_client import make_client, make_pool
from .settings import StoreLocation, credential_chain, endpoint_of, region_of

SMALL_LIMIT = 16 * 1024 * 1024
"""The most bytes read whole from one answer (a listing page, an index record, an error)."""
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_NS = re.compile(r"^\{[^}]*\}")


class S3Error(Exception):
    """The service answered ``status`` (with an S3 error ``code`` when it sent one)."""

    def __init__(self, status: int, code: str = "", message: str = "") -> None:
        super().__init__(f"{status} {code} {message}".strip())
        self.status = status
        self.code = code


class PreconditionFailed(S3Error):
    """412: ``If-None-Match: *`` found the key taken, or ``If-Match`` another ETag."""


class StoreUnreachable(Exception):
    """No answer from the store: refused, reset, or past the deadline."""


@attrs.frozen
class ObjectInfo:
    key: str
    size: int
    etag: str  # without quotes
    modified: float = 0.0  # Last-Modified (the service's clock, POSIX seconds); 0: not known


def _etag(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return (value or "").strip().strip('"')


def _modified(text: str) -> float:
    """A listing's LastModified (``2026-12-07T04:32:40.123Z``) as POSIX seconds; 0: unreadable."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _strip(tag: str) -> str:
    return _NS.sub("", tag)


def _children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [child for child in element if _strip(child.tag) == name]


def _text(element: ElementTree.Element, name: str) -> str:
    found = _children(element, name)
    return (found[0].text or "") if found else ""


class S3Client:
    """One bucket of one S3 service. ``http`` is a treq ``HTTPClient``; ``credentials`` a
    minio ``Provider`` (``settings.credential_chain()``), asked in a thread when what it gave
    expired (instance and web-identity credentials are fetched over the network)."""

    def __init__(
        self,
        http: Any,
        *,
        endpoint: str,
        region: str,
        location: StoreLocation,
        credentials: Any,
        clock: IReactorTime,
        timeout: float = 10.0,
    ) -> None:
        self.http = http
        self.clock = clock
        self.endpoint = endpoint.rstrip("/")
        self.region = region
        self.location = location
        self.bucket = location.bucket
        self.timeout = timeout
        self._provider = credentials
        self._credentials: Credentials | None = None
        self._netloc = urlsplit(self.endpoint).netloc

    # -- plumbing ----------------------------------------------------------------------------

    def url(self, key: str, query: str = "") -> str:
        path = "/" + quote(self.bucket) + "/" + quote(key, safe="/-_.~")
        return self.endpoint + path + ("?" + query if query else "")

    async def _creds(self) -> Credentials:
        current = self._credentials
        if current is None or current.is_expired():
            # The first retrieval and refreshes may block on the network (IMDS, STS).
            fetched: Credentials = await deferToThread(self._provider.retrieve)
            self._credentials = current = fetched
        return current

    async def request(
        self,
        method: str,
        key: str,
        *,
        query: str = "",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        timeout: float | None = None,
    ) -> IResponse:
        """One signed request; the response unread (its status not checked)."""
        creds = await self._creds()
        url = self.url(key, query)
        sent: dict[str, Any] = dict(headers or {})
        sent["Host"] = self._netloc
        payload_hash = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        sent["x-amz-content-sha256"] = payload_hash
        if creds.session_token:
            sent["X-Amz-Security-Token"] = creds.session_token
        date = datetime.now(timezone.utc)
        sent["x-amz-date"] = amz_time.to_amz_date(date)
        signed = sign_v4_s3(
            method=method,
            url=urlsplit(url),
            region=self.region,
            headers=sent,
            credentials=creds,
            content_sha256=payload_hash,
            date=date,
        )
        wire = Headers({k.encode(): [str(v).encode()] for k, v in signed.items() if k != "Host"})
        try:
            response: IResponse = await self.http.request(
                method,
                url,
                headers=wire,
                data=body if body or method in ("PUT", "POST") else None,
                timeout=self.timeout if timeout is None else timeout,
                unbuffered=True,
                allow_redirects=False,
            )
        except Exception as error:
            raise StoreUnreachable(f"{method} {key}: {error!r}") from error
        return response

    async def read_body(self, response: IResponse) -> bytes:
        length = response.length
        if isinstance(length, int) and length > SMALL_LIMIT:
            response.deliverBody(Abandon())
            raise S3Error(response.code, "TooLarge", f"{length} bytes")
        try:
            data: bytes = await read_bounded(response, SMALL_LIMIT, self.clock, self.timeout)
        except Exception as error:
            raise StoreUnreachable(f"reading an answer: {error!r}") from error
        return data

    async def _check(self, response: IResponse, *ok: int) -> bytes:
        """The body of an answer with one of the ``ok`` statuses; raises otherwise."""
        data = await self.read_body(response)
        if response.code in ok:
            return data
        raise self._error(response.code, data)

    @staticmethod
    def _error(status: int, data: bytes) -> S3Error:
        code = message = ""
        try:
            root = ElementTree.fromstring(data) if data else None
        except ElementTree.ParseError:
            root = None
        if root is not None:
            code, message = _text(root, "Code"), _text(root, "Message")
        if status == 412:
            return PreconditionFailed(status, code or "PreconditionFailed", message)
        return S3Error(status, code, message)

    # -- objects -----------------------------------------------------------------------------

    async def get(
        self, key: str, first: int | None = None, last: int | None = None
    ) -> IResponse | None:
        """The object's response, body unread (200, or 206 for a range), or None (absent).
        ``last`` None: to the end."""
        headers: dict[str, str] = {}
        if first is not None:
            headers["Range"] = f"bytes={first}-" + ("" if last is None else str(last))
        response = await self.request("GET", key, headers=headers)
        if response.code in (200, 206):
            return response
        data = await self.read_body(response)
        if response.code == 404:
            return None
        raise self._error(response.code, data)

    async def read(self, key: str, limit: int = SMALL_LIMIT) -> bytes | None:
        """A small object whole, or None (absent)."""
        response = await self.get(key)
        if response is None:
            return None
        if isinstance(response.length, int) and response.length > limit:
            response.deliverBody(Abandon())
            raise S3Error(response.code, "TooLarge", f"{key}: {response.length} bytes")
        return await self.read_body(response)

    async def head(self, key: str) -> ObjectInfo | None:
        response = await self.request("HEAD", key)
        await self.read_body(response)
        if response.code == 404:
            return None
        if response.code != 200:
            raise S3Error(response.code)
        length = response.headers.getRawHeaders(b"content-length", [b"0"])[0]
        etag = _etag(response.headers.getRawHeaders(b"etag", [b""])[0])
        return ObjectInfo(key, int(length), etag)

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        content_type: str = "application/octet-stream",
    ) -> str:
        """Store a small object; its ETag. ``if_none_match``: only if the key is free;
        ``if_match``: only if it holds that ETag (sent unquoted: RGW 16 takes only that).
        Raises ``PreconditionFailed`` when the condition does not hold."""
        headers = {"Content-Type": content_type}
        if if_none_match:
            headers["If-None-Match"] = "*"
        if if_match is not None:
            headers["If-Match"] = if_match
        response = await self.request("PUT", key, headers=headers, body=data)
        await self._check(response, 200)
        return _etag(response.headers.getRawHeaders(b"etag", [b""])[0])

    async def delete(self, key: str) -> None:
        response = await self.request("DELETE", key)
        await self._check(response, 204, 200, 404)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Every key under ``prefix`` (all pages)."""
        found: list[ObjectInfo] = []
        token = ""
        while True:
            query = "list-type=2&prefix=" + quote(prefix, safe="")
            if token:
                query += "&continuation-token=" + quote(token, safe="")
            response = await self.request("GET", "", query=query)
            root = ElementTree.fromstring(await self._check(response, 200))
            for item in _children(root, "Contents"):
                found.append(
                    ObjectInfo(
                        _text(item, "Key"),
                        int(_text(item, "Size")),
                        _etag(_text(item, "ETag")),
                        _modified(_text(item, "LastModified")),
                    )
                )
            token = _text(root, "NextContinuationToken")
            if _text(root, "IsTruncated") != "true" or not token:
                return found

    async def presign_get(self, key: str, expires: int) -> str:
        """A URL that GETs ``key`` without credentials for ``expires`` seconds."""
        creds = await self._creds()
        query = ""
        if creds.session_token:
            query = "X-Amz-Security-Token=" + quote(creds.session_token, safe="")
        url = presign_v4(
            method="GET",
            url=urlsplit(self.url(key, query)),
            region=self.region,
            credentials=creds,
            date=datetime.now(timezone.utc),
            expires=expires,
        )
        return url.geturl()

    # -- multipart uploads -------------------------------------------------------------------

    async def create_multipart(self, key: str) -> str:
        response = await self.request(
            "POST", key, query="uploads=", headers={"Content-Type": "application/octet-stream"}
        )
        root = ElementTree.fromstring(await self._check(response, 200))
        upload_id = _text(root, "UploadId")
        if not upload_id:
            raise S3Error(response.code, "NoUploadId")
        return upload_id

    async def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        query = f"partNumber={number}&uploadId={quote(upload_id, safe='')}"
        response = await self.request("PUT", key, query=query, body=data)
        await self._check(response, 200)
        return _etag(response.headers.getRawHeaders(b"etag", [b""])[0])

    async def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[tuple[int, str]]
    ) -> None:
        body = _complete_body(parts)
        query = "uploadId=" + quote(upload_id, safe="")
        headers = {"Content-Type": "application/xml"}
        response = await self.request("POST", key, query=query, headers=headers, body=body)
        data = await self._check(response, 200)
        # S3 may answer 200 and still fail the completion in the body.
        if data and _strip(ElementTree.fromstring(data).tag) == "Error":
            raise self._error(500, data)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        response = await self.request("DELETE", key, query="uploadId=" + quote(upload_id, safe=""))
        await self._check(response, 204, 200, 404)


def _complete_body(parts: Iterable[tuple[int, str]]) -> bytes:
    items = "".join(
        f"<Part><PartNumber>{n}</PartNumber><ETag>&quot;{etag}&quot;</ETag></Part>"
        for n, etag in parts
    )
    return f"<CompleteMultipartUpload>{items}</CompleteMultipartUpload>".encode()


def s3_client(
    reactor: Any,
    location: StoreLocation,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    pool: Any = None,
) -> S3Client:
    """A client for ``location`` with the endpoint, region and credentials of the standard
    AWS variables and files (``settings``); ``AWS_CA_BUNDLE`` names extra CAs to trust."""
    env = os.environ if env is None else env
    region = region_of(env)
    pool = make_pool(reactor) if pool is None else pool
    http = make_client(reactor, pool=pool, ca_file=env.get("AWS_CA_BUNDLE") or None)
    return S3Client(
        http,
        endpoint=endpoint_of(env, region),
        region=region,
        location=location,
        credentials=credential_chain(),
        clock=reactor,
        timeout=timeout,
    )
