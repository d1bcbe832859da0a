"""What a fresh interpreter loads and prints: the supervisor's modules, ``twist regproxy
--help``, a module that must not install the reactor (subprocesses, hence here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


SUPERVISOR_SIDE = """
import json, sys
from twisted.internet.testing import MemoryReactorClock
from regproxy.tap import Options, makeService

options = Options(environ={})
options.parseOptions(sys.argv[1:])
service = makeService(options, reactor=MemoryReactorClock(), argv=[])
service.startService()
service.stopService()
print(json.dumps(sorted(sys.modules)))
"""
# What only workers use: the upstream client and its parser, the cache, the resources,
# the metrics (the supervisor serves none).
WORKERS_ONLY = (
    "treq",
    "httptools",
    "twisted.web.server",
    "prometheus_client",
    "regproxy.service",
    "regproxy.web",
    "regproxy.upstream",
    "regproxy.cache.store",
    "regproxy.cache.fetcher",
    "regproxy.routing.snapshot",
    "regproxy.server.endpoints",
    "regproxy.server.listen_tls",
)


def test_the_supervisor_loads_nothing_only_workers_use(tmp_path: Path) -> None:
    """Each process of ``--workers N`` pays for what it imports in memory: the supervisor,
    which serves nothing, must not carry the serving side. A fresh interpreter runs the
    supervisor's path (options, makeService, start and stop) and lists its modules."""
    args = ["--workers", "2", "--cache-dir", str(tmp_path / "cache")]
    args += ["--port", "tcp:0:interface=127.0.0.1", "--metrics-port", "tcp:0:interface=127.0.0.1"]
    run = subprocess.run(
        [sys.executable, "-c", SUPERVISOR_SIDE, *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    modules = set(json.loads(run.stdout.splitlines()[-1]))
    assert "regproxy.server.supervisor" in modules  # the path did run
    loaded = [
        name
        for name in modules
        if any(name == one or name.startswith(one + ".") for one in WORKERS_ONLY)
    ]
    assert loaded == []


def test_twist_help() -> None:
    environ = dict(os.environ)
    environ.update(
        {
            "AUTH_HEADER": "Bearer HELPSECRET",
            "REGISTRY_HOST": "gcr.io",
            "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "twisted", "regproxy", "--help"],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for option in ("--upstream", "--repo-prefix", "--port", "--auth-header", "--blob-redirects"):
        assert option in result.stdout
    assert "HELPSECRET" not in result.stdout + result.stderr


def test_module_does_not_import_the_reactor() -> None:
    code = (
        "import sys, regproxy.server.upstream_health; "
        "sys.exit('twisted.internet.reactor' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
