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
