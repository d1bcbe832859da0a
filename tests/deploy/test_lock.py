"""requirements/runtime.txt, setup.cfg, setup.py and the installed versions agree.

The image installs the lock (``pip install --require-hashes -r requirements/runtime.txt``),
``pip install .`` installs setup.py's requirements (setup.cfg's ranges plus the lock's
pins), and the tests run on whatever the test venv holds: the three run the same code
only while these pass. After a change to setup.cfg's install_requires, ``requirements/lock``
and a reinstall (``pip install '.[test]'``) bring them together again (docs/image.rst).
"""

from __future__ import annotations

import configparser
import re
import runpy
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "runtime.txt"
# The image's Python, for which the lock is compiled (its header says so).
IMAGE_PYTHON = {"python_version": "3.11", "python_full_version": "3.11.0"}


def _locked() -> dict[str, tuple[str, str | None]]:
    """name -> (version, marker or None), from the lock's entries."""
    entries: dict[str, tuple[str, str | None]] = {}
    for line in LOCK.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;([^\\]*))?", line)
        if match:
            name, version, marker = match.groups()
            entries[canonicalize_name(name)] = (version, marker.strip() if marker else None)
    return entries


def _direct() -> set[str]:
    """The lock's entries that it lists because setup.cfg asks for them."""
    names = set()
    for block in re.split(r"\n(?=\S)", LOCK.read_text()):
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==", block)
        if match and "regproxy (setup.cfg)" in block:
            names.add(canonicalize_name(match.group(1)))
    return names


def _setup_cfg_requirements() -> list[Requirement]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines()
    return [Requirement(line) for line in map(str.strip, lines) if line and line[0] != "#"]


def _for_image(requirement: Requirement) -> bool:
    return requirement.marker is None or requirement.marker.evaluate(IMAGE_PYTHON)


def _setup_py_requirements(monkeypatch: pytest.MonkeyPatch, unlocked: bool) -> list[str]:
    """The install_requires setup.py hands to setuptools (setup() itself not run)."""
    import setuptools

    captured: dict[str, Any] = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    if unlocked:
        monkeypatch.setenv("REGPROXY_UNLOCKED", "1")
    else:
        monkeypatch.delenv("REGPROXY_UNLOCKED", raising=False)
    runpy.run_path(str(ROOT / "setup.py"), run_name="setup")
    return list(captured["install_requires"])


def test_lock_lists_exactly_what_setup_cfg_asks_for() -> None:
    wanted = {canonicalize_name(r.name) for r in _setup_cfg_requirements() if _for_image(r)}
    assert _direct() == wanted, "setup.cfg changed: run requirements/lock"


def test_locked_versions_are_in_setup_cfg_ranges() -> None:
    locked = _locked()
    for requirement in filter(_for_image, _setup_cfg_requirements()):
        version, _ = locked[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version, prereleases=True), (requirement, version)


def test_installed_versions_are_the_locked_ones() -> None:
    """The test venv runs what the image runs (fails after a pip install that ignored
    the lock, or a lock regenerated without reinstalling)."""
    if sys.version_info[:2] != (3, 11):
        pytest.fail(f"the lock is for Python 3.11, the tests run on {sys.version}")
    drift = {}
    for name, (version, marker) in _locked().items():
        if marker and not Marker(marker).evaluate():
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "(not installed)"
        if installed != version:
            drift[name] = f"locked {version}, installed {installed}"
    assert not drift, drift


def test_setup_py_pins_every_locked_version(monkeypatch: pytest.MonkeyPatch) -> None:
    requirements = _setup_py_requirements(monkeypatch, unlocked=False)
    ranges = [str(r) for r in _setup_cfg_requirements()]
    pins = {
        canonicalize_name(r.name): str(r.specifier)
        for r in map(Requirement, requirements)
        if str(r.specifier).startswith("==")
    }
    assert pins == {name: f"=={version}" for name, (version, _) in _locked().items()}
    # The ranges stay too: they hold the markers for other Pythons (tomli).
    assert [str(Requirement(r)) for r in requirements[: len(ranges)]] == ranges


def test_lock_command_sees_the_ranges_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """requirements/lock sets REGPROXY_UNLOCKED=1: with the old pins in the metadata,
    pip-compile could never move a version."""
    requirements = _setup_py_requirements(monkeypatch, unlocked=True)
    assert [str(Requirement(r)) for r in requirements] == [
        str(r) for r in _setup_cfg_requirements()
    ]
    assert "REGPROXY_UNLOCKED=1" in (ROOT / "requirements" / "lock").read_text()
