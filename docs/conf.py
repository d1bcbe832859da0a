"""Sphinx configuration: ``sphinx-build -W -b html docs docs/_build`` (tests/deploy/test_docs.py)."""

from __future__ import annotations

import pathlib
import sys

# The checkout's regproxy, for its version (regproxy/__init__.py imports nothing else).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from regproxy import __version__  # noqa: E402

project = "regproxy"
author = "the regproxy authors"
release = version = __version__

root_doc = "index"
exclude_patterns = ["_build"]
highlight_language = "none"

html_theme = "alabaster"
html_title = f"regproxy {release}"
