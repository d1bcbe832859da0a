"""``--cache-max-size`` with ``--cache-store`` bounds the store; the local tier in front
keeps the default bound, never more than the store's; eviction timing from the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.python import usage

from regproxy.cache.sizes import default_max_size
from regproxy.config import Config, StoreTiming
from regproxy.tap import Options

GIB = 1024**3


def parse(args: list[str], environ: dict[str, str] | None = None) -> Config:
    options = Options(environ=environ or {})
    options.parseOptions(["--upstream", "https://registry.example", *args])
    return options.config()


def test_with_a_store_the_size_bounds_the_store_and_caps_the_tier(tmp_path: Path) -> None:
    store = ["--cache-store", "s3://bucket/p", "--cache-dir", str(tmp_path)]
    cache = parse([*store, "--cache-max-size", "1G"]).cache
    assert cache is not None
    assert cache.store_max_size == GIB
    assert cache.max_size == min(GIB, default_max_size(str(tmp_path)))
    huge = parse([*store, "--cache-max-size", "100000T"]).cache
    assert huge is not None and huge.store_max_size == 100000 * 1024**4
    assert huge.max_size == default_max_size(str(tmp_path))  # the tier: its disk's default
    unbounded = parse(store).cache
    assert unbounded is not None and unbounded.store_max_size is None  # lifecycle rules
    assert unbounded.max_size == default_max_size(str(tmp_path))


def test_without_a_store_the_size_bounds_the_directory(tmp_path: Path) -> None:
    cache = parse(["--cache-dir", str(tmp_path), "--cache-max-size", "100000T"]).cache
    assert cache is not None
    assert cache.max_size == 100000 * 1024**4 and cache.store_max_size is None


def test_eviction_timing_from_the_environment(tmp_path: Path) -> None:
    store = ["--cache-store", "s3://bucket/p", "--cache-dir", str(tmp_path)]
    cache = parse(store).cache
    assert cache is not None and cache.store_timing == StoreTiming(600.0, 300.0, 1200.0)
    environ = {
        "REGPROXY_CACHE_SERVED_EVERY": "0",
        "REGPROXY_CACHE_EVICT_EVERY": "2",
        "REGPROXY_CACHE_EVICT_MIN_IDLE": "0",
        "REGPROXY_CACHE_LEASE_TTL": "2",
    }
    cache = parse(store, environ).cache
    assert cache is not None and cache.store_timing == StoreTiming(0.0, 2.0, 0.0, 2.0)
    with pytest.raises(usage.UsageError, match="REGPROXY_CACHE_EVICT_EVERY"):
        parse(store, {"REGPROXY_CACHE_EVICT_EVERY": "0"})
    # A lease that never expires, or a typo, is a one-line start-up error, not a traceback.
    for wrong in ("0", "soon"):
        with pytest.raises(usage.UsageError, match="REGPROXY_CACHE_LEASE_TTL"):
            parse(store, {"REGPROXY_CACHE_LEASE_TTL": wrong})


def test_the_temporary_tier_is_private_and_removed_at_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import atexit

    removals: list[tuple[object, ...]] = []
    monkeypatch.setattr(atexit, "register", lambda *call: removals.append(call))
    cache = parse(["--cache-store", "s3://bucket/p"]).cache
    assert cache is not None and os.path.isdir(cache.directory)
    assert os.stat(cache.directory).st_mode & 0o077 == 0
    assert [call[1] for call in removals] == [cache.directory]
    os.rmdir(cache.directory)


def test_no_writable_temporary_directory_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", "/proc/no-such-directory")
    with pytest.raises(usage.UsageError, match="give --cache-dir, or mount a tmpfs at /tmp"):
        parse(["--cache-store", "s3://bucket/p"])
