"""``python -m bench.cache --smoke``, end to end: the cache benchmark must keep running and
its figures must be sane (not a timed test)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.tools import require_tools

REPO_ROOT = Path(__file__).resolve().parents[2]
require_tools(
    [tool for tool in ("docker-registry", "wrk", "curl") if shutil.which(tool) is None],
    "the cache benchmark",
)


def test_cache_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "cache.json"
    subprocess.run(
        [sys.executable, "-m", "bench.cache", "--smoke", "--json", str(out)],
        cwd=REPO_ROOT,
        check=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert result["blob_hit_mb_s"]["regproxy"] > 0 and result["blob_hit_mb_s"]["direct"] > 0
    assert result["manifest_hit"]["regproxy"]["errors"] == 0
    assert result["streams"]["errors"] == 0
    assert result["streams"]["completed"] == result["streams"]["streams"]
    cold = result["cold"]
    assert cold["upstream_gets"] == 1 and cold["all_verified"]
    # Behind the slow upstream: one process, --workers 2, two processes on one directory.
    for key in ("cold_slow_upstream", "cold_slow_workers", "cold_slow_processes"):
        slow = result[key]
        assert slow["upstream_gets"] == 1 and slow["relay_blob_answers"] == 1, key
        assert slow["all_verified"] and not slow["errors"], key
        # Every client's first byte was timed against the download's first byte.
        assert len(slow["first_byte_after_download_s"]) == slow["clients"], key
        assert all(t >= 0 for t in slow["first_byte_after_download_s"]), key
        assert slow["download_s"] > 0 and slow["one_client_s"] > 0, key
        assert sum(slow["served_by"].values()) == slow["clients"], key
    # The clients were spread: each worker, each process served half of them.
    assert (
        served(result["cold_slow_workers"], "worker 1")
        == served(result["cold_slow_workers"], "worker 2")
        == result["cold_slow_workers"]["clients"] // 2
    )
    assert (
        served(result["cold_slow_processes"], "process 0")
        == served(result["cold_slow_processes"], "process 1")
        == result["cold_slow_processes"]["clients"] // 2
    )


def served(run: dict[str, object], where: str) -> int:
    served_by = run["served_by"]
    assert isinstance(served_by, dict)
    return sum(count for label, count in served_by.items() if f"{where} " in label)
