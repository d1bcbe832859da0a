"""The image test's stand-in base, built in the background from the start of the run.

Cold, deploy/docker/standin-base (debootstrap from the Debian mirror, then a podman
import) takes a couple of minutes, mostly waiting on the mirror; the suite's other tests
run meanwhile, so the image test waits only for what is left. ``start`` is called by
tests/conftest.py when the image test is selected; ``base_image`` is what the test uses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

STANDIN = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "standin-base"
# One build at a time on a machine: pytest-xdist's workers each see the image test
# collected, and the one that runs it may not be the one that started the build; the
# second waits for the first and then finds its result cached.
LOCK = "/tmp/regproxy-standin.lock"

_running: tuple[subprocess.Popen[bytes], Path, Path] | None = None


def start() -> None:
    """Start the stand-in build (once), its output in temporary files."""
    global _running
    if _running is not None:
        return
    directory = Path(tempfile.mkdtemp(prefix="regproxy-standin-"))
    out, err = directory / "stdout", directory / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            ["flock", LOCK, "sh", str(STANDIN)],
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    _running = (process, out, err)


def base_image(timeout: float = 900) -> str:
    """The stand-in base's name: from the background build, or built now."""
    start()
    assert _running is not None
    process, out, err = _running
    returncode = process.wait(timeout)
    assert returncode == 0, err.read_text(errors="replace")
    return out.read_text().split()[-1]


def stop() -> None:
    """End a background build the run no longer waits for (its whole process group)."""
    if _running is not None and _running[0].poll() is None:
        os.killpg(_running[0].pid, signal.SIGTERM)
        _running[0].wait(30)
