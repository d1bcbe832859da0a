"""The ``--workers`` runtime directory: where it is made, in what order, and the one line
when nowhere is writable."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from regproxy.server.runtime_dir import (
    FIXED_CANDIDATES,
    RuntimeDirectory,
    candidates,
)
from regproxy.server.startup import StartupError


def test_the_service_manager_s_directory_first_then_the_user_s_then_tmpdir() -> None:
    environ = {
        "RUNTIME_DIRECTORY": "/run/regproxy:/run/other",
        "XDG_RUNTIME_DIR": "/run/user/1000",
        "TMPDIR": "/scratch",
    }
    assert candidates(environ) == (
        "/run/regproxy",
        "/run/user/1000",
        "/scratch",
        *FIXED_CANDIDATES,
    )


def test_memory_first_among_the_fixed_places() -> None:
    assert candidates({}) == ("/dev/shm", "/tmp", "/var/tmp")


def test_each_place_once_and_relative_paths_ignored() -> None:
    environ = {"RUNTIME_DIRECTORY": "", "XDG_RUNTIME_DIR": "relative", "TMPDIR": "/tmp"}
    assert candidates(environ) == ("/tmp", "/dev/shm", "/var/tmp")


def test_made_in_the_first_writable_candidate_private_with_metrics_in_it(
    tmp_path: Path,
) -> None:
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o500)
    writable = tmp_path / "writable"
    writable.mkdir()
    environ = {"RUNTIME_DIRECTORY": str(tmp_path / "missing"), "XDG_RUNTIME_DIR": str(readonly)}
    if os.geteuid() == 0:
        environ["XDG_RUNTIME_DIR"] = "/proc/1"  # root writes anywhere but there
    made = RuntimeDirectory.make(environ, workers=2, fixed=(str(writable), "/tmp"))
    try:
        assert Path(made.path).parent == writable
        assert stat.S_IMODE(os.stat(made.path).st_mode) == 0o700
        assert Path(made.metrics) == Path(made.path) / "metrics"
        assert Path(made.metrics).is_dir()
    finally:
        made.remove()
    assert not Path(made.path).exists()


def test_nowhere_writable_is_one_line_saying_what_to_mount(tmp_path: Path) -> None:
    environ = {"RUNTIME_DIRECTORY": str(tmp_path / "missing")}
    with pytest.raises(StartupError) as caught:
        RuntimeDirectory.make(environ, workers=3, fixed=("/proc/1",))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--workers 3: the workers need a writable directory")
    assert f"{tmp_path / 'missing'}, /proc/1" in message
    assert "--tmpfs /tmp" in message and "RUNTIME_DIRECTORY" in message
