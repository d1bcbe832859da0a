"""``python -m bench.hashing --smoke``, end to end: the consistent-hashing benchmark keeps
running and its figures are sane (not a timed test)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.nginx import nginx_binary
from tests.support.tools import require_tools

REPO_ROOT = Path(__file__).resolve().parents[2]
require_tools(
    [tool for tool in ("docker-registry", "curl") if shutil.which(tool) is None]
    + ([] if nginx_binary() else ["nginx"]),
    "the consistent-hashing benchmark",
)


def test_hashing_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "hashing.json"
    subprocess.run(
        [sys.executable, "-m", "bench.hashing", "--smoke", "--json", str(out)],
        cwd=REPO_ROOT,
        check=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    hashed, spread = result["hash"], result["round-robin"]
    for run in (hashed, spread):
        assert run["all_verified"] and not run["errors"]
        assert run["one_client_s"] > 0 and run["all_clients_s"] > 0
        assert sum(run["served_by"].values()) == run["clients"]
    # The hash sends every client to one replica: one upstream GET for the cluster; round
    # robin (each nginx worker its own) spreads them, and each replica fetches the blob.
    assert hashed["upstream_gets"] == 1
    assert len(replicas(hashed)) == 1
    assert spread["upstream_gets"] == len(replicas(spread)) >= 2


def replicas(run: dict[str, dict[str, int]]) -> set[str]:
    return {label.split(" cache=")[0] for label in run["served_by"]}
