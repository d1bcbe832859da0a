"""regproxy.protocol is pure: importing any of its modules loads no HTTP client, no parser,
no reactor and nothing of the packages above it (a fresh interpreter per module, hence
an integration test)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import regproxy.protocol

FORBIDDEN = (
    "treq",
    "httptools",
    "twisted.internet.reactor",
    "regproxy.cache",
    "regproxy.routing",
    "regproxy.server",
    "regproxy.upstream",
    "regproxy.web",
)
MODULES = sorted(m.name for m in pkgutil.iter_modules(regproxy.protocol.__path__))


def test_the_package_has_modules() -> None:
    assert {"errors", "fetch", "headers", "mapping", "reference", "rewrite"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_importing_loads_nothing_impure(module: str) -> None:
    # A fresh interpreter: this test process has imported everything already.
    code = (
        "import sys, importlib\n"
        f"importlib.import_module('regproxy.protocol.{module}')\n"
        f"bad = [n for n in sys.modules if n.startswith({FORBIDDEN!r})]\n"
        "print(','.join(bad))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "", f"regproxy.protocol.{module} loads {loaded}"
