"""A blob streamed into a multipart upload as it arrives, completed only when its sha256 matched.

Verified before visible: the object appears under its final key only on
``CompleteMultipartUpload``, which is sent once every byte was hashed to the expected
digest; on a mismatch, a failed part or a broken source the upload is aborted and nothing
was ever visible. Parts are ``part_size`` bytes (at least S3's 5 MiB minimum, except the
last); at most ``max_in_flight`` are being sent at once, and while that many are, the
upload asks its source to pause (``on_pressure(True)``), so memory holds at most about
``(max_in_flight + 1) * part_size`` bytes, never the whole blob, and nothing goes to disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .client import S3Client

MIN_PART = 5 * 1024 * 1024
MAX_PARTS = 10_000


def part_size_for(size: int | None, preferred: int = MIN_PART) -> int:
    """A part size that fits ``size`` bytes in S3's 10,000 parts, never below 5 MiB
    (unknown size: the preferred size, which holds blobs up to 10,000 parts of it)."""
    chosen = max(preferred, MIN_PART)
    if size is not None and size > chosen * (MAX_PARTS - 1):
        chosen = -(-size // (MAX_PARTS - 1))
    return chosen


class UploadFailed(Exception):
    """The upload was aborted: a digest mismatch, a part the store refused, or the source."""


class StreamedUpload:
    """One object being uploaded to ``key`` as its bytes arrive (``write``), checked against
    ``digest`` (``sha256:<hex>``) at ``finish``."""

    log = Logger()

    def __init__(
        self,
        client: S3Client,
        key: str,
        digest: str,
        *,
        part_size: int = MIN_PART,
        max_in_flight: int = 2,
        on_pressure: Callable[[bool], None] | None = None,
    ) -> None:
        self.client = client
        self.key = key
        self.hex = digest.partition(":")[2]
        self.part_size = max(part_size, 1)
        self.max_in_flight = max(max_in_flight, 1)
        self.on_pressure = on_pressure
        self.received = 0
        self.failure: Failure | None = None
        self._hash = hashlib.sha256()
        self._buffer = bytearray()
        self._upload_id: Deferred[str | None] | None = None
        self._in_flight: dict[int, Deferred[None]] = {}
        self._etags: dict[int, str] = {}
        self._next_part = 1
        self._pressed = False
        self._over = False

    @property
    def failed(self) -> bool:
        return self.failure is not None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def begin(self) -> Deferred[str | None]:
        """Start the upload (its id; None: it could not be created, ``failure`` says why);
        writes may come before it is known."""
        if self._upload_id is None:
            self._upload_id = ensureDeferred(self._create())
        return self._upload_id

    async def _create(self) -> str | None:
        try:
            return await self.client.create_multipart(self.key)
        except Exception:
            self._fail(Failure())
            return None

    async def _id(self) -> str:
        uid = await _copy(self.begin())
        if uid is None:
            raise UploadFailed(f"{self.key}: the upload could not be created")
        return uid

    def write(self, data: bytes) -> None:
        if self._over or self.failure is not None or not data:
            return
        self.begin()
        self._hash.update(data)
        self.received += len(data)
        self._buffer += data
        while len(self._buffer) >= self.part_size:
            part = bytes(self._buffer[: self.part_size])
            del self._buffer[: self.part_size]
            self._send(part)

    def _send(self, data: bytes) -> None:
        number = self._next_part
        self._next_part += 1

        async def send() -> None:
            uid = await self._id()
            self._etags[number] = await self.client.upload_part(self.key, uid, number, data)

        sent = ensureDeferred(send())
        self._in_flight[number] = sent
        sent.addErrback(self._fail)
        sent.addBoth(self._part_done, number)
        self._pressure()

    def _part_done(self, result: object, number: int) -> None:
        self._in_flight.pop(number, None)
        self._pressure()

    def _pressure(self) -> None:
        pressed = len(self._in_flight) >= self.max_in_flight and self.failure is None
        if pressed != self._pressed:
            self._pressed = pressed
            if self.on_pressure is not None:
                self.on_pressure(pressed)

    def _fail(self, failure: Failure) -> None:
        if self.failure is None:
            self.failure = failure
            self.log.warn(
                "upload of {key} failed: {why}", key=self.key, why=failure.getErrorMessage()
            )
            self._buffer = bytearray()
            self._pressure()

    async def finish(self, size: int | None = None) -> bool:
        """The source ended: send the rest and complete the upload if every byte hashed to the
        digest (and ``size`` bytes arrived, when given); abort otherwise. True: the object is
        under its key."""
        if self._over:
            return False
        if self.failure is None and (self.received == 0 or self._buffer):
            # The last part (the only one, maybe empty, for a small object).
            self._send(bytes(self._buffer))
            self._buffer = bytearray()
        self._over = True
        if self._in_flight:
            await DeferredList(list(self._in_flight.values()), consumeErrors=True)
        matched = self._hash.hexdigest() == self.hex and (size is None or size == self.received)
        if self.failure is None and not matched:
            self.failure = Failure(UploadFailed(f"{self.key}: bytes do not match the digest"))
            self.log.warn("not storing {key}: its bytes do not match its digest", key=self.key)
        if self.failure is None:
            try:
                uid = await self._id()
                parts = sorted(self._etags.items())
                await self.client.complete_multipart(self.key, uid, parts)
                return True
            except Exception:
                self._fail(Failure())
        await self._abort()
        return False

    async def abort(self, reason: str = "the source failed") -> None:
        """Give the upload up (the download failed, its client left)."""
        if self._over:
            return
        self._over = True
        self._fail(Failure(UploadFailed(f"{self.key}: {reason}")))
        if self._in_flight:
            await DeferredList(list(self._in_flight.values()), consumeErrors=True)
        await self._abort()

    async def _abort(self) -> None:
        if self._upload_id is None:
            return
        uid = await _copy(self._upload_id)
        if uid is None:
            return
        try:
            await self.client.abort_multipart(self.key, uid)
        except Exception:
            # Left to the bucket's rule for incomplete uploads; never visible either way.
            self.log.info("aborting the upload of {key} failed", key=self.key)


def _copy(source: Deferred[str | None]) -> Deferred[str | None]:
    """A Deferred with ``source``'s result, leaving ``source``'s own chain untouched (it is
    awaited by every part)."""
    copy: Deferred[str | None] = Deferred()

    def forward(result: str | None) -> str | None:
        copy.callback(result)
        return result

    source.addBoth(forward)
    return copy
