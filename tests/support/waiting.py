"""Waiting on a condition with a deadline, instead of sleeping a fixed time.

``eventually`` is the one way tests (and the fixtures in tests/support) wait: a fixed sleep
is either too short on a loaded machine or wasted time on an idle one. A check that finds
the wait hopeless (the process it waits for exited) raises, which ends the wait at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(
    check: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    *,
    what: str | Callable[[], str] = "condition",
) -> T:
    """``check()`` once it is truthy; AssertionError with its last value past the deadline.

    ``what`` names the condition in that error; a callable is asked only then (for a log
    read at the deadline, say).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            break
        time.sleep(interval)
    if not value:
        described = what() if callable(what) else what
        raise AssertionError(f"{described} not met within {timeout} s (last value: {value!r})")
    return value
