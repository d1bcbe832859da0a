"""regproxy's install requirements: the ranges in setup.cfg plus the lock's exact versions.

setup.cfg's ``install_requires`` says what regproxy needs (ranges, the input of
pip-compile); requirements/runtime.txt (``requirements/lock`` writes it) says which
versions it was tested with, every package down to the last transitive one, with
hashes. Both go into the metadata here, so ``pip install .`` (the README's and CI's
command), the test venv and the image (``pip install --require-hashes -r
requirements/runtime.txt``) run the same code: a range alone let pip pick a newer
google-auth or idna than the image had.

regproxy is a service installed into a venv of its own (README, docs/image.rst),
not a library other projects depend on, so exact versions cost nobody a conflict.
``requirements/lock`` sets REGPROXY_UNLOCKED=1, so pip-compile sees the ranges only
and can move the versions on. tests/deploy/test_lock.py fails when setup.cfg and the
lock disagree, or when the installed versions are not the locked ones.
"""

from __future__ import annotations

import configparser
import os
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
LOCK = HERE / "requirements" / "runtime.txt"
# "name==version" or "name==version ; marker", the first line of each entry.
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(;[^\\]*)?")


def ranges() -> list[str]:
    config = configparser.ConfigParser()
    config.read(HERE / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines()
    return [line for line in map(str.strip, lines) if line and not line.startswith("#")]


def locked() -> list[str]:
    if os.environ.get("REGPROXY_UNLOCKED") == "1" or not LOCK.exists():
        return []
    pins = []
    for line in LOCK.read_text().splitlines():
        match = PIN.match(line)
        if match:
            name, version, marker = match.groups()
            pins.append(f"{name}=={version}" + (f"; {marker[1:].strip()}" if marker else ""))
    return pins


setup(install_requires=ranges() + locked())
