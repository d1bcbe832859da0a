"""Run-wide hooks: the image test's slow stand-in base starts building as the run starts."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.support import standin


def pytest_collection_finish(session: pytest.Session) -> None:
    selected = any(item.nodeid.startswith("tests/deploy/test_image.py") for item in session.items)
    tools = all(shutil.which(tool) for tool in ("podman", "debootstrap"))
    if selected and tools and os.geteuid() == 0:
        standin.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    standin.stop()
