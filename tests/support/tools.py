"""Skipping tests whose real tools are missing, except where they must run (CI)."""

from __future__ import annotations

import os

import pytest


def require_tools(missing: list[str], what: str) -> None:
    """Skip when ``missing`` names anything; fail instead under REGPROXY_REQUIRE_INTEGRATION=1,
    so CI can never pass by skipping the real-parts tests."""
    if not missing:
        return
    reason = f"{what} not installed: " + ", ".join(missing)
    if os.environ.get("REGPROXY_REQUIRE_INTEGRATION") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)
