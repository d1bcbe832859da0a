"""Packages by job, imports down the layers: read from the source (no import needed).

server -> web -> access -> routing -> cache -> upstream -> protocol, with tls (the TLS layer) and
config (the frozen configuration) at the bottom. Two packages never import each other, and a
module never imports a package above its own.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import regproxy

ROOT = pathlib.Path(regproxy.__file__).parent
LAYER = {
    "config": 0,
    "tls": 0,
    "protocol": 1,
    "upstream": 2,
    "cache": 3,
    "routing": 4,
    "access": 5,
    "web": 6,
    "server": 7,
}
# The plugin's options and the wiring: they may import anything, nothing imports them.
TOP = {"tap", "service", "environment", "option_values"}


def part_of(path: pathlib.Path) -> str:
    relative = path.relative_to(ROOT)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported(path: pathlib.Path) -> set[str]:
    """The regproxy parts (package or top-level module) a module imports."""
    tree = ast.parse(path.read_text())
    package = ["regproxy", *path.relative_to(ROOT).parts[:-1]]
    found = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "regproxy" and len(parts) > 1 and parts[1] in LAYER.keys() | TOP:
                found.add(parts[1])
    return found


MODULES = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_top_level_holds_only_options_and_wiring() -> None:
    top = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
    assert top <= TOP | {"config"}, top - TOP


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_the_layers(path: pathlib.Path) -> None:
    here = part_of(path)
    if here in TOP or here == "__init__":
        return
    for other in imported(path) - {here}:
        assert other not in TOP, f"{path.name} imports the wiring ({other})"
        assert LAYER[other] < LAYER[here], f"{here}/{path.name} imports {other}, a layer above"


def test_no_module_is_over_600_lines() -> None:
    lines = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in MODULES}
    assert {name: n for name, n in lines.items() if n > 600} == {}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_private_modules_are_imported_only_inside_their_package(path: pathlib.Path) -> None:
    """``_name.py`` hides behind its package's face (``upstream/_pool.py`` behind
    ``upstream/treq_client.py``): nothing outside the package imports it."""
    here = part_of(path)
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            private = [p for p in parts if p.startswith("_") and p != "__future__"]
            if not private:
                continue
            package = parts[parts.index(private[0]) - 1] if node.level == 0 else None
            owner = package if package not in (None, "regproxy") else here
            if node.level >= 2 or (node.level == 0 and owner != here):
                raise AssertionError(f"{path.name} imports the private {node.module}")
