"""``python -m bench.store --smoke``, end to end: the object-store benchmark must keep
running and its figures must be sane (not a timed test)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.rgw import missing_programs
from tests.support.tools import require_tools

REPO_ROOT = Path(__file__).resolve().parents[2]
require_tools(
    [tool for tool in ("docker-registry", "curl") if shutil.which(tool) is None]
    + missing_programs(),
    "the object store benchmark",
)


def test_store_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "store.json"
    subprocess.run(
        [sys.executable, "-m", "bench.store", "--smoke", "--json", str(out)],
        cwd=REPO_ROOT,
        check=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    assert result["store_hit"]["regproxy_mb_s"] > 0 and result["store_hit"]["rgw_mb_s"] > 0
    cold = result["cold"]
    assert cold["upstream_gets"] == 1 and cold["all_verified"]
    assert result["redirects"]["blob_redirect_cpu_ms"] > 0
