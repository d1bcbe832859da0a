"""The cache's S3 client (regproxy/cache/s3) against a real Ceph RGW: every call, conditional
writes, presigned URLs, streamed multipart uploads that appear only when verified."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from regproxy.cache.s3.client import (
    ObjectInfo,
    PreconditionFailed,
    S3Client,
    S3Error,
    StoreUnreachable,
    s3_client,
)
from regproxy.cache.s3.multipart import MIN_PART, StreamedUpload
from regproxy.cache.s3.settings import StoreLocation
from tests.support.ports import free_port
from tests.support.rgw import RGWServer


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class S3ClientTests(TestCase):
    timeout = 60

    @pytest.fixture(autouse=True)
    def _rgw(self, rgw: RGWServer) -> None:
        self.rgw = rgw

    def setUp(self) -> None:
        # Here, not in the fixture: trial runs only the cleanups added once it runs the test.
        self.bucket = self.rgw.new_bucket()
        self.client = self.make_client(self.rgw.env())

    def make_client(self, env: dict[str, str], timeout: float = 10.0) -> S3Client:
        location = StoreLocation.parse(f"s3://{self.bucket}/p")
        self.pool = pool = _pool()
        self.addCleanup(pool.closeCachedConnections)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the credential chain reads the process's environment

        def restore() -> None:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

        self.addCleanup(restore)
        return s3_client(reactor, location, env=env, timeout=timeout, pool=pool)

    def blocking(self) -> Any:
        return self.rgw.client()

    def test_put_get_head_delete(self) -> Any:
        async def run() -> None:
            c = self.client
            self.assertIsNone(await c.head("p/a"))
            self.assertIsNone(await c.get("p/a"))
            etag = await c.put("p/a", b"hello world")
            self.assertEqual(etag, hashlib.md5(b"hello world").hexdigest())
            self.assertEqual(await c.head("p/a"), ObjectInfo("p/a", 11, etag))
            self.assertEqual(await c.read("p/a"), b"hello world")
            ranged = await c.get("p/a", 6, 8)
            assert ranged is not None
            self.assertEqual(ranged.code, 206)
            self.assertEqual(await _body(ranged), b"wor")
            tail = await c.get("p/a", 6)
            assert tail is not None
            self.assertEqual(await _body(tail), b"world")
            await c.delete("p/a")
            await c.delete("p/a")  # absent: not an error
            self.assertIsNone(await c.head("p/a"))

        return ensureDeferred(run())

    def test_conditional_put(self) -> Any:
        async def run() -> None:
            c = self.client
            first = await c.put("p/lease", b"one", if_none_match=True)
            with self.assertRaises(PreconditionFailed):
                await c.put("p/lease", b"two", if_none_match=True)
            self.assertEqual(await c.read("p/lease"), b"one")
            with self.assertRaises(PreconditionFailed):
                await c.put("p/lease", b"three", if_match="0" * 32)
            second = await c.put("p/lease", b"four", if_match=first)
            self.assertNotEqual(first, second)
            self.assertEqual(await c.read("p/lease"), b"four")
            # The old ETag no longer matches: a renewal by a holder that lost the lease fails.
            with self.assertRaises(PreconditionFailed):
                await c.put("p/lease", b"five", if_match=first)

        return ensureDeferred(run())

    def test_list_by_prefix(self) -> Any:
        async def run() -> None:
            c = self.client
            for key in ("p/x/1", "p/x/2", "p/y/1"):
                await c.put(key, key.encode())
            listed = await c.list("p/x/")
            self.assertEqual([(o.key, o.size) for o in listed], [("p/x/1", 5), ("p/x/2", 5)])
            self.assertEqual(await c.list("p/z/"), [])

        return ensureDeferred(run())

    def test_presigned_get(self) -> Any:
        async def run() -> str:
            await self.client.put("p/blob", b"presigned bytes")
            return await self.client.presign_get("p/blob", 60)

        def check(url: str) -> None:
            self.assertIn("X-Amz-Expires=60", url)
            with urllib.request.urlopen(url, timeout=10) as answer:
                self.assertEqual(answer.read(), b"presigned bytes")
            tampered = url.replace("p/blob", "p/other")
            with self.assertRaises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(tampered, timeout=10)
            self.assertEqual(refused.exception.code, 403)

        return ensureDeferred(run()).addCallback(check)

    def test_wrong_secret_is_refused(self) -> Any:
        client = self.make_client({**self.rgw.env(), "AWS_SECRET_ACCESS_KEY": "wrong"})

        async def run() -> None:
            with self.assertRaises(S3Error) as refused:
                await client.put("p/a", b"x")
            self.assertEqual(refused.exception.status, 403)

        return ensureDeferred(run())

    def test_unreachable_store(self) -> Any:
        env = {**self.rgw.env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
        client = self.make_client(env, timeout=2.0)

        async def run() -> None:
            with self.assertRaises(StoreUnreachable):
                await client.head("p/a")

        return ensureDeferred(run())

    # -- streamed multipart uploads ------------------------------------------------------------

    def _upload(self, data: bytes, digest: str, **kwargs: Any) -> tuple[StreamedUpload, Any]:
        upload = StreamedUpload(self.client, "p/blobs/x", digest, **kwargs)

        async def run() -> bool:
            for offset in range(0, len(data), 256 * 1024):
                upload.write(data[offset : offset + 256 * 1024])
            return await upload.finish(len(data))

        return upload, ensureDeferred(run())

    def test_multipart_verified_appears(self) -> Any:
        data = os.urandom(2 * MIN_PART + 12345)
        pressure: list[bool] = []
        upload, done = self._upload(data, _digest(data), on_pressure=pressure.append)

        async def check(completed: bool) -> None:
            self.assertTrue(completed)
            self.assertEqual(await self.client.read("p/blobs/x", limit=len(data)), data)
            info = await self.client.head("p/blobs/x")
            assert info is not None
            self.assertEqual(info.size, len(data))
            self.assertTrue(info.etag.endswith("-3"), info.etag)  # three parts
            self.assertIn(True, pressure)  # two parts in flight asked the source to pause
            self.assertEqual(pressure[-1], False)
            self.assertEqual(upload.received, len(data))

        return done.addCallback(lambda ok: ensureDeferred(check(ok)))

    def test_multipart_small_and_empty(self) -> Any:
        async def run() -> None:
            for data in (b"", b"small"):
                upload = StreamedUpload(self.client, "p/small", _digest(data))
                upload.write(data)
                self.assertTrue(await upload.finish(len(data)))
                self.assertEqual(await self.client.read("p/small"), data)

        return ensureDeferred(run())

    def test_multipart_mismatch_never_visible(self) -> Any:
        data = os.urandom(MIN_PART + 10)
        upload, done = self._upload(data, _digest(data + b"!"))

        async def check(completed: bool) -> None:
            self.assertFalse(completed)
            self.assertTrue(upload.failed)
            self.assertIsNone(await self.client.head("p/blobs/x"))
            uploads = list(self.blocking()._list_multipart_uploads(self.bucket).uploads)
            self.assertEqual(uploads, [])  # aborted, not left behind

        return done.addCallback(lambda ok: ensureDeferred(check(ok)))

    def test_multipart_short_never_visible(self) -> Any:
        data = os.urandom(1000)
        upload = StreamedUpload(self.client, "p/blobs/x", _digest(data))
        upload.write(data[:500])

        async def run() -> None:
            self.assertFalse(await upload.finish(len(data)))
            self.assertIsNone(await self.client.head("p/blobs/x"))

        return ensureDeferred(run())

    def test_multipart_abort(self) -> Any:
        data = os.urandom(MIN_PART + 10)
        upload = StreamedUpload(self.client, "p/blobs/x", _digest(data))
        upload.write(data)

        async def run() -> None:
            await upload.abort()
            self.assertFalse(await upload.finish())
            self.assertIsNone(await self.client.head("p/blobs/x"))
            uploads = list(self.blocking()._list_multipart_uploads(self.bucket).uploads)
            self.assertEqual(uploads, [])

        return ensureDeferred(run())


def _pool() -> Any:
    from regproxy.upstream.treq_client import make_pool

    return make_pool(reactor)


def _body(response: Any) -> Any:
    from regproxy.upstream.reading import read_bounded

    return read_bounded(response, 1 << 20, reactor, 10.0)
