"""The index under faults, and the media types of manifests: a write that fails costs a
later upstream question, never an error, and the index recovers when writes work again."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import Logger

from regproxy.cache.faults import WriteFailures
from regproxy.cache.index import CacheIndex
from regproxy.cache.metrics import RecordingMetrics

from .cache_faults import FailingVolume
from .cache_helpers import FakeClock, digest_of

OCI_INDEX = b"application/vnd.oci.image.index.v1+json"


def make_index(root: Path, metrics: RecordingMetrics | None = None) -> CacheIndex:
    failures = WriteFailures(metrics or RecordingMetrics())
    return CacheIndex(str(root), clock=FakeClock(), failures=failures)


def test_a_tag_record_that_cannot_be_written_is_not_an_error_and_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = RecordingMetrics()
    index = make_index(tmp_path, metrics)
    volume = FailingVolume(monkeypatch, str(tmp_path))
    volume.on = True
    digest = digest_of(b"manifest")
    for _ in range(3):
        index.record_tag("hub", "app", "latest", "", digest)
    assert index.tag("hub", "app", "latest", "") is None  # the upstream will be asked
    assert metrics.counters["store_write_errors"] == 3
    assert [p.name for p in tmp_path.rglob(".tmp-*")] == []
    volume.on = False
    index.record_tag("hub", "app", "latest", "", digest)  # not taken as "already written"
    record = make_index(tmp_path).tag("hub", "app", "latest", "")
    assert record is not None and record.digest == digest


def test_repository_membership_that_cannot_be_written_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = make_index(tmp_path)
    volume = FailingVolume(monkeypatch, str(tmp_path), errno.EROFS)
    volume.on = True
    digest = digest_of(b"layer")
    index.record_repository_digest("hub", "app", digest)
    assert not index.repository_holds("hub", "app", digest)
    volume.on = False
    index.record_repository_digest("hub", "app", digest)
    assert make_index(tmp_path).repository_holds("hub", "app", digest)


def test_index_failures_are_logged_once_per_streak(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(WriteFailures, "log", Logger(observer=events.append))
    index = make_index(tmp_path)
    volume = FailingVolume(monkeypatch, str(tmp_path))
    volume.on = True
    for n in range(10):
        index.record_tag("hub", "app", f"t{n}", "", digest_of(b"m"))
        index.record_media_type(digest_of(b"%d" % n), OCI_INDEX)
        # An empty file still fits on a full volume: its success must not end the tag
        # record's streak (or a full disk would log twice per request).
        index.record_repository_digest("hub", "app", digest_of(b"%d" % n))
    assert [e["what"] for e in events] == ["tag record", "media type"]
    volume.on = False
    index.record_tag("hub", "app", "t0", "", digest_of(b"m"))
    volume.on = True
    index.record_tag("hub", "app", "t1", "", digest_of(b"m2"))
    assert [e["log_level"].name for e in events] == ["warn", "warn", "info", "warn"]


def test_a_media_type_survives_a_restart(tmp_path: Path) -> None:
    digest = digest_of(b'{"manifests": []}')
    make_index(tmp_path).record_media_type(digest, OCI_INDEX)
    fresh = make_index(tmp_path)
    assert fresh.media_type(digest) == OCI_INDEX
    assert fresh.media_type(digest_of(b"other")) is None


def test_a_media_type_recorded_by_another_process_is_read(tmp_path: Path) -> None:
    mine, other = make_index(tmp_path), make_index(tmp_path)
    digest = digest_of(b"m")
    assert mine.media_type(digest) is None
    other.record_media_type(digest, b"application/vnd.docker.distribution.manifest.v2+json")
    assert mine.media_type(digest) == b"application/vnd.docker.distribution.manifest.v2+json"


@pytest.mark.parametrize(
    "value", [b"", b"text/plain\r\nX-Injected: 1", b"a" * 256, b"caf\xc3\xa9/x"]
)
def test_a_media_type_that_is_no_header_value_is_not_recorded(
    tmp_path: Path, value: bytes
) -> None:
    index = make_index(tmp_path)
    digest = digest_of(b"m")
    index.record_media_type(digest, value)
    assert make_index(tmp_path).media_type(digest) is None


def test_a_torn_media_type_file_reads_as_unknown(tmp_path: Path) -> None:
    index = make_index(tmp_path)
    digest = digest_of(b"m")
    index.record_media_type(digest, OCI_INDEX)
    [path] = [p for p in (tmp_path / "media").rglob("*") if p.is_file()]
    path.write_bytes(b"")
    assert make_index(tmp_path).media_type(digest) is None


def test_a_media_type_that_cannot_be_written_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = RecordingMetrics()
    index = make_index(tmp_path, metrics)
    volume = FailingVolume(monkeypatch, str(tmp_path))
    volume.on = True
    digest = digest_of(b"m")
    index.record_media_type(digest, OCI_INDEX)
    assert index.media_type(digest) is None
    assert metrics.counters["store_write_errors"] == 1
    volume.on = False
    index.record_media_type(digest, OCI_INDEX)
    assert make_index(tmp_path).media_type(digest) == OCI_INDEX
