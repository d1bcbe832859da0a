"""Skipping tests whose real tools are missing, except where they must run (CI).

Every test that needs something outside the Python test dependencies (a program, an
optional module, a capability of the host) skips through ``require_tools`` and nothing
else: no ``pytest.skip``, ``skipif`` or ``importorskip`` of its own. So
REGPROXY_REQUIRE_INTEGRATION=1 turns every such skip into a failure, and CI can never pass
by skipping the real-parts tests.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest

# Where system tools live that are not always on an unprivileged PATH.
SYSTEM_DIRECTORIES = "/usr/sbin:/sbin"


def require_tools(missing: Sequence[str], what: str, *, why: str = "not installed") -> None:
    """Skip when ``missing`` names anything; fail instead under REGPROXY_REQUIRE_INTEGRATION=1.

    ``why`` words the reason (``not installed``, ``not available``): the skip says
    "<what> <why>: <missing, ...>".
    """
    if not missing:
        return
    reason = f"{what} {why}: " + ", ".join(missing)
    if os.environ.get("REGPROXY_REQUIRE_INTEGRATION") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def find_program(name: str) -> str | None:
    """``name`` on PATH, beside this interpreter (a venv's bin, not always on PATH), or in
    the system directories."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name) or shutil.which(name, path=SYSTEM_DIRECTORIES)


def require_programs(*programs: str, what: str) -> list[str]:
    """The paths of ``programs``; skip (or fail) naming the missing ones.

    A program may be given as ``"name (how to install it)"``: the part before the space is
    looked up, the whole goes into the reason.
    """
    found = {program: find_program(program.split(" ")[0]) for program in programs}
    require_tools([program for program, path in found.items() if path is None], what)
    return [path for path in found.values() if path is not None]


def require_program(program: str, what: str) -> str:
    """The path of one program (see ``require_programs``)."""
    [path] = require_programs(program, what=what)
    return path


def require_module(name: str, what: str, install: str = "") -> ModuleType:
    """The module ``name`` imported; skip (or fail) when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        require_tools([f"{name} ({install})" if install else name], what)
        raise  # (not reached: require_tools skipped or failed)


def require_capability(available: bool, what: str, detail: str) -> None:
    """Skip (or fail) when the host lacks a capability a test needs (a tool's option, a
    privilege): ``detail`` says which."""
    require_tools([] if available else [detail], what, why="not available")


def systemd_socket_activate() -> str:
    """The path of ``systemd-socket-activate``, which hands regproxy a listening socket as
    systemd does (three modules start regproxy through it)."""
    return require_program("systemd-socket-activate (Debian package systemd)", "socket activation")
