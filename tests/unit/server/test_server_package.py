"""The process side sits at the top: nothing below imports ``regproxy.server``, and the TLS
layer under both the upstream and the listeners imports nothing of regproxy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[3] / "regproxy"


def imported(path: Path) -> set[str]:
    """Absolute names of the regproxy modules ``path`` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "regproxy" or name.startswith("regproxy.")}


@pytest.mark.parametrize("below", ["web", "cache", "upstream", "tls"])
def test_no_package_below_imports_the_server(below: str) -> None:
    for path in (PACKAGE / below).rglob("*.py"):
        upward = {name for name in imported(path) if name.startswith("regproxy.server")}
        assert not upward, f"{path.relative_to(PACKAGE)} imports {sorted(upward)}"


def test_the_tls_layer_imports_nothing_of_regproxy() -> None:
    for path in (PACKAGE / "tls").rglob("*.py"):
        assert imported(path) == set(), path


def test_the_import_reader_resolves_relative_imports() -> None:
    """The checks above are only as good as this reader: it sees ``from ..server import x``."""
    assert "regproxy.server.startup" in imported(PACKAGE / "service.py")
    assert "regproxy.tls.layer" in imported(PACKAGE / "upstream" / "_tls.py")
    assert "regproxy.server.startup.StartupError" in imported(PACKAGE / "server" / "listen.py")
