"""``python -m bench.cpu`` end to end with tiny sizes: the rows of issue 16's CPU targets must
keep running and measure what they say (not a timed test)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.tools import require_tools

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("docker-registry", "skopeo", "nginx", "wrk", "curl")


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    missing = [t for t in TOOLS if not shutil.which(t) and not shutil.which(t, path="/usr/sbin")]
    require_tools(missing, "the CPU benchmark")
    out = tmp_path_factory.mktemp("cpu") / "cpu.json"
    servers = "regproxy,regproxy-cache,nginx-cache,site"
    argv = [sys.executable, "-m", "bench.cpu", "--servers", servers, "--seconds", "1"]
    argv += ["--repeats", "1", "--blob-size", "2MiB", "--workers", "2", "--json", str(out)]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "regproxy-cache / nginx-cache" in result.stdout  # the ratio is printed
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_cached_rows_are_hits_by_digest(figures: dict[str, Any]) -> None:
    for label in ("regproxy-cache", "nginx-cache"):
        row = figures[label]
        assert row["cached"] and row["manifest_reference"] == "digest"
        # No GET; no revalidating HEAD per request either (by tag: one each). A worker the
        # warm-up missed may check once that the repository holds the digest.
        assert row["upstream_get"] == [0.0] and row["upstream_head"][0] < 0.01
        assert row["ms"][0] > 0 and row["rps"][0] > 0
    # The uncached row goes upstream on every request.
    assert figures["regproxy"]["manifest_reference"] == "tag"
    assert figures["regproxy"]["upstream_get"][0] > 0.5


def test_blob_rows_hit_and_miss(figures: dict[str, Any]) -> None:
    for label in ("regproxy-cache", "nginx-cache"):
        row = figures[label]
        assert len(row["mbs"]) == len(row["miss_mbs"]) == 1
        assert row["mbs"][0] > 0 and row["miss_mbs"][0] > 0
    assert figures["regproxy"]["mbs"][0] > 0 and figures["regproxy"]["miss_mbs"] == []
    assert figures["site"]["mbs"] == []  # it answers every GET with the manifest


def test_rss_of_supervisor_and_each_worker(figures: dict[str, Any]) -> None:
    for label in ("regproxy", "regproxy-cache"):
        roles = [role for role, _ in figures[label]["rss_kib"]]
        assert roles == ["supervisor", "worker", "worker"]
        assert all(kib > 0 for _, kib in figures[label]["rss_kib"])
    assert [role for role, _ in figures["site"]["rss_kib"]] == ["process"]
