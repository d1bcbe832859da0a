"""``python -m bench.access`` end to end, briefly: both rows measure manifest GETs answered
200 (the Bearer row through a token the proxy issued); not a timed test."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.tools import require_tools

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_access_benchmark_runs() -> None:
    missing = [tool for tool in ("docker-registry", "skopeo", "wrk") if not shutil.which(tool)]
    require_tools(missing, "the access benchmark")
    argv = [sys.executable, "-m", "bench.access", "--seconds", "1", "--repeats", "1"]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    for label in ("without [auth]", "Bearer verified"):
        line = next(line for line in result.stdout.splitlines() if line.startswith(label))
        assert float(re.findall(r"([0-9.]+) ms", line)[0]) > 0
    assert "admission check alone" in result.stdout
