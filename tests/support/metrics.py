"""Reading the proxy's Prometheus text output in tests."""

from __future__ import annotations

import re

ACCEPT = "Accept: application/vnd.oci.image.manifest.v1+json"


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text output (labels in any order)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(3))
    return None
