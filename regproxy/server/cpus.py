"""What ``--workers auto`` means: the CPUs this process may really use."""

from __future__ import annotations

import math
import os
from pathlib import Path


def cpus_available() -> int:
    """CPUs this process may use: its affinity mask, bounded by a cgroup v2 CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def worker_count(text: str) -> int:
    text = text.strip().lower()
    if text == "auto":
        return cpus_available()
    if not text.isdigit() or int(text) < 1:
        raise ValueError("give a positive number of processes, or 'auto' (one per CPU)")
    return int(text)


worker_count.coerceDoc = "A number of processes, or 'auto' for one per CPU."  # type: ignore[attr-defined]
