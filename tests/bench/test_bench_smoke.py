"""The benchmark suite's smoke run (``python -m bench --smoke``), end to end.

Not a timed test: it only keeps the suite from rotting. Every run (plain and TLS upstream,
``--workers 2`` and 1) and every calibration row must be present, every throughput positive,
every digest fetched correct, no concurrent pull may fail, and the CPU columns must count
regproxy's workers. Skipped when a tool is missing, unless REGPROXY_REQUIRE_INTEGRATION=1.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.report import BEGIN, END, write_docs
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
RUNS = {"plain-w2", "plain-w1", "tls-w2", "tls-w1"}
CALIBRATIONS = {
    "twisted.web Site",
    "Agent relay",
    "treq relay",
    "regproxy agent relay",
    "treq over regproxy agent",
}


def _missing() -> list[str]:
    found = {
        name: shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") for name in TOOLS
    }
    return [f"{name} (Debian package {TOOLS[name]})" for name, path in found.items() if not path]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_tools(_missing(), "benchmark tools")
    directory = tmp_path_factory.mktemp("bench")
    out = directory / "smoke.json"
    page = directory / "benchmarks.rst"
    shutil.copy(REPO_ROOT / "docs" / "benchmarks.rst", page)
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json", str(out), "--write-docs", str(page)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "regproxy/nginx" in result.stdout  # the table was printed
    data: dict[str, Any] = json.loads(out.read_text())
    data["page"] = page.read_text()
    return data


def test_every_run_and_row_present(smoke: dict[str, Any]) -> None:
    assert set(smoke["runs"]) == RUNS
    for key, run in smoke["runs"].items():
        assert run["workers"] == int(key[-1]) and run["nginx_workers"] == run["workers"]
        assert run["upstream_tls"] == run["listener_tls"] == key.startswith("tls")
        assert set(run) >= {"verified", "blob", "manifest"}
        assert set(run["manifest"]) == {"1", "16", "64"}
        for row in run["manifest"].values():
            assert set(row) >= set(PATHS)
        assert set(run["blob"]) >= set(PATHS)
        if key.startswith("plain"):
            assert set(run["pulls"]) == set(PATHS)
            assert set(run["memory"]) >= {"slow_stream", "concurrent_streams"}
    assert smoke["machine"]["nproc"]
    names = [t["target"] for t in smoke["targets"]]
    assert len(names) == len(set(names)) == 2 * 8 + 2 * 5


def test_content_fetched_through_every_path_is_correct(smoke: dict[str, Any]) -> None:
    for run in smoke["runs"].values():
        verified = run["verified"]
        assert all(verified[p]["ok"] for p in PATHS), verified
        assert len({verified[p]["bytes"] for p in PATHS}) == 1  # the same bytes each way


def test_throughputs_and_rates_positive(smoke: dict[str, Any]) -> None:
    for run in smoke["runs"].values():
        for p in PATHS:
            assert run["blob"][p]["median_mb_s"] > 0
            assert len(run["blob"][p]["runs_mb_s"]) == smoke["settings"]["repeats"]
            for row in run["manifest"].values():
                assert row[p]["rps"] > 0 and row[p]["p99_ms"] >= row[p]["p50_ms"] > 0
                assert row[p]["errors"] == 0 and row[p]["non2xx"] == 0
        assert run["blob"]["ratio_regproxy_nginx"] > 0
        assert run["regproxy_alive"]


def test_cpu_columns_count_every_regproxy_process(smoke: dict[str, Any]) -> None:
    # The supervisor itself hardly runs: CPU per request above zero means its workers count.
    for run in smoke["runs"].values():
        for row in run["manifest"].values():
            assert row["regproxy"]["cpu_ms_per_request"] > 0
            assert row["nginx"]["cpu_ms_per_request"] >= 0
        assert run["blob"]["regproxy"]["cpu_s_per_gib"] >= 0


def test_calibration_rows_for_both_upstreams(smoke: dict[str, Any]) -> None:
    assert set(smoke["calibration"]) == {"plain", "tls"}
    for calibration in smoke["calibration"].values():
        assert calibration["manifest_bytes"] > 0
        assert set(calibration["rows"]) == CALIBRATIONS
        for row in calibration["rows"].values():
            assert set(row) == {"1", "16"}
            for stats in row.values():
                assert stats["rps"] > 0 and stats["errors"] == stats["non2xx"] == 0
                assert stats["cpu_ms_per_request"] > 0


def test_no_errors_in_pulls_and_streams(smoke: dict[str, Any]) -> None:
    for key in ("plain-w2", "plain-w1"):
        run = smoke["runs"][key]
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


def test_tables_are_written_into_the_page_once(smoke: dict[str, Any], tmp_path: Path) -> None:
    page = smoke["page"]

    def lines(text: str, marker: str) -> list[int]:
        """Where ``marker`` stands as a line of its own (the page's prose names it too)."""
        return [m.start() for m in re.finditer(rf"^{re.escape(marker)}$", text, re.MULTILINE)]

    [begin], [end] = lines(page, BEGIN), lines(page, END)
    block = page[begin:end]
    assert "5. Calibration" in block and "regproxy --workers 2" in block
    assert end < page.index("\nAnalysis\n========")
    copy = tmp_path / "page.rst"
    copy.write_text(page)
    write_docs({k: v for k, v in smoke.items() if k != "page"}, copy)
    assert copy.read_text() == page  # the same run again: replaced in place, not added
    assert len(lines(copy.read_text(), BEGIN)) == 1
