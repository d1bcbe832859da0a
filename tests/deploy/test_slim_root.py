"""deploy/docker/slim-root, the script that fills the image's root: offline checks of its
path copying and of what it leaves out of the standard library (the image build itself,
with check-root proving the result runs, is tests/deploy/test_image.py)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _slim_root() -> ModuleType:
    path = str(ROOT / "deploy" / "docker" / "slim-root")
    loader = importlib.machinery.SourceFileLoader("slim_root", path)
    spec = importlib.util.spec_from_loader("slim_root", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


slim_root = _slim_root()


def _inside(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def test_copy_path_makes_every_link_on_the_way_again(tmp_path: Path) -> None:
    """As /lib64 -> usr/lib64 and ld-linux -> /lib/x86_64-linux-gnu/...: the links keep
    their targets, the file at the end is copied, nothing else comes along."""
    system = tmp_path / "system"
    (system / "usr" / "lib" / "arch").mkdir(parents=True)
    (system / "usr" / "lib64").mkdir()
    (system / "usr" / "lib" / "arch" / "ld.so").write_bytes(b"\x7fELF loader")
    (system / "usr" / "lib" / "arch" / "other.so").write_bytes(b"not wanted")
    (system / "lib").symlink_to("usr/lib")
    (system / "lib64").symlink_to("usr/lib64")
    absolute = system / "lib" / "arch" / "ld.so"
    (system / "usr" / "lib64" / "ld.so").symlink_to(absolute)
    out = tmp_path / "out"

    slim_root.copy_path(str(system / "lib64" / "ld.so"), out)

    assert os.readlink(_inside(out, system / "lib64")) == "usr/lib64"
    assert os.readlink(_inside(out, system / "usr" / "lib64" / "ld.so")) == str(absolute)
    assert os.readlink(_inside(out, system / "lib")) == "usr/lib"
    copied = _inside(out, system / "usr" / "lib" / "arch" / "ld.so")
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_bytes() == b"\x7fELF loader"
    assert not _inside(out, system / "usr" / "lib" / "arch" / "other.so").exists()


def test_copy_path_of_a_directory_creates_it_empty(tmp_path: Path) -> None:
    (tmp_path / "etc" / "certs").mkdir(parents=True)
    (tmp_path / "etc" / "certs" / "a.pem").write_text("x")
    (tmp_path / "certs").symlink_to(tmp_path / "etc" / "certs")
    out = tmp_path / "out"
    slim_root.copy_path(str(tmp_path / "certs"), out)
    assert _inside(out, tmp_path / "certs").is_symlink()
    assert _inside(out, tmp_path / "etc" / "certs").is_dir()
    assert not list(_inside(out, tmp_path / "etc" / "certs").iterdir())


@pytest.mark.parametrize(
    "relative",
    [
        "ensurepip",
        "idlelib",
        "tkinter",
        "lib2to3",
        "turtle.py",
        "distutils",
        "site-packages",
        "config-3.11-x86_64-linux-gnu",
        "unittest/test",
        "test",
        "lib-dynload/_testcapi.cpython-311-x86_64-linux-gnu.so",
        "lib-dynload/readline.cpython-311-x86_64-linux-gnu.so",
    ],
)
def test_left_out_of_the_standard_library(relative: str) -> None:
    assert slim_root.excluded(relative)


@pytest.mark.parametrize(
    "relative",
    [
        "asyncio",
        "email",
        "http",
        "json",
        "ssl.py",
        "tempfile.py",
        "unittest",
        "importlib",
        "__pycache__/ssl.cpython-311.pyc",
        "lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so",
        "lib-dynload/_hashlib.cpython-311-x86_64-linux-gnu.so",
        "lib-dynload/_ctypes.cpython-311-x86_64-linux-gnu.so",
        "lib-dynload/_asyncio.cpython-311-x86_64-linux-gnu.so",
        "sqlite3",
        "lib-dynload/_sqlite3.cpython-311-x86_64-linux-gnu.so",
    ],
)
def test_kept_in_the_standard_library(relative: str) -> None:
    assert not slim_root.excluded(relative)
