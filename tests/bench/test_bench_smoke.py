"""The benchmark suite's smoke run (``python -m bench --smoke --no-tls``), end to end.

Not a timed test: it only keeps the suite from rotting. Every row must be present, every
throughput positive, every digest fetched correct and no concurrent pull may fail. Skipped
when a tool is missing, unless REGPROXY_REQUIRE_INTEGRATION=1.
"""

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
TOOLS = {
    "docker-registry": "docker-registry",
    "skopeo": "skopeo",
    "nginx": "nginx-light",
    "wrk": "wrk",
    "curl": "curl",
}
PATHS = ("direct", "nginx", "regproxy")


def _missing() -> list[str]:
    found = {
        name: shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") for name in TOOLS
    }
    return [f"{name} (Debian package {TOOLS[name]})" for name, path in found.items() if not path]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_tools(_missing(), "benchmark tools")
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--no-tls", "--json", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "regproxy/nginx" in result.stdout  # the table was printed
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_every_row_present(smoke: dict[str, Any]) -> None:
    assert set(smoke["runs"]) == {"plain"}
    run = smoke["runs"]["plain"]
    assert set(run) >= {"verified", "blob", "manifest", "pulls", "memory"}
    assert set(run["manifest"]) == {"1", "16", "64"}
    for row in run["manifest"].values():
        assert set(row) >= set(PATHS)
    assert set(run["blob"]) >= set(PATHS)
    assert set(run["pulls"]) == set(PATHS)
    assert set(run["memory"]) >= {"slow_stream", "concurrent_streams"}
    assert smoke["machine"]["nproc"]
    names = {t["target"] for t in smoke["targets"]}
    assert len(names) == 6 and all(t["value"] is not None for t in smoke["targets"])


def test_content_fetched_through_every_path_is_correct(smoke: dict[str, Any]) -> None:
    verified = smoke["runs"]["plain"]["verified"]
    assert all(verified[p]["ok"] for p in PATHS), verified
    assert len({verified[p]["bytes"] for p in PATHS}) == 1  # the same bytes each way


def test_throughputs_and_rates_positive(smoke: dict[str, Any]) -> None:
    run = smoke["runs"]["plain"]
    for p in PATHS:
        assert run["blob"][p]["median_mb_s"] > 0
        assert len(run["blob"][p]["runs_mb_s"]) == smoke["settings"]["repeats"]
        for row in run["manifest"].values():
            assert row[p]["rps"] > 0 and row[p]["p99_ms"] >= row[p]["p50_ms"] > 0
            assert row[p]["errors"] == 0 and row[p]["non2xx"] == 0
    assert run["blob"]["ratio_regproxy_nginx"] > 0
    assert run["regproxy_alive"]


def test_no_errors_in_pulls_and_streams(smoke: dict[str, Any]) -> None:
    run = smoke["runs"]["plain"]
    for p in PATHS:
        pulls = run["pulls"][p]
        assert pulls["errors"] == 0, pulls["error_samples"]
        assert pulls["pulls"] == smoke["settings"]["pulls"] and pulls["wall_s"] > 0
    memory = run["memory"]
    assert memory["slow_stream"]["errors"] == 0
    assert memory["slow_stream"]["received"] == memory["slow_stream"]["blob_bytes"]
    streams = memory["concurrent_streams"]
    assert streams["errors"] == 0 and streams["completed"] == streams["streams"]
    assert memory["slow_stream"]["peak_rss_mib"] > 0 and memory["proxy_alive"]
