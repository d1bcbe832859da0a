"""Run the proxy with a wall clock the test can move forward: a minute passes without waiting.

``python shifted_clock.py ACK_FILE twist-args...`` replaces ``time.time`` before Twisted is
imported (``twisted.python.runtime.seconds``, the reactor's clock, is ``time.time`` bound at
import), then runs ``python -m twisted twist-args...``. On SIGUSR2 the process reads the
number of seconds in ``ACK_FILE + ".shift"``, adds it to its clock, and writes the total
to ``ACK_FILE``, so the test knows the shift is in force. Only the reactor's notion of now
moves (token expiry, key caches, rate-limit windows); monotonic time and OpenSSL's
certificate checks do not.

:class:`ShiftedProxy` is :class:`RegproxyProcess` started this way, with ``advance(s)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    import os
    import runpy
    import signal
    import time

    # As ``python -m``: the working directory first, not this directory (whose proxy.py,
    # redis.py, tls.py ... would shadow modules of those names).
    sys.path[0] = os.getcwd()

    ack = Path(sys.argv[1])
    shift = [0.0]
    real_time = time.time

    def shifted_time() -> float:
        return real_time() + shift[0]

    def advance(signum: int, frame: object) -> None:
        shift[0] += float(Path(f"{ack}.shift").read_text())
        ack.write_text(repr(shift[0]))

    time.time = shifted_time
    signal.signal(signal.SIGUSR2, advance)
    sys.argv = ["twist", *sys.argv[2:]]
    runpy.run_module("twisted", run_name="__main__", alter_sys=True)
    raise SystemExit(0)


import signal as _signal

from .proxy import RegproxyProcess
from .waiting import eventually


class ShiftedProxy(RegproxyProcess):
    """The proxy on a clock that ``advance`` moves forward (see the module)."""

    shifted = 0.0

    @property
    def ack_file(self) -> Path:
        return self.directory / "clock-shift"

    @property
    def argv(self) -> list[str]:
        twist = super().argv
        assert twist[1:3] == ["-m", "twisted"]
        return [twist[0], __file__, str(self.ack_file), *twist[3:]]

    def advance(self, seconds: float) -> None:
        """Move the proxy's clock ``seconds`` forward; returns once it has moved."""
        Path(f"{self.ack_file}.shift").write_text(repr(float(seconds)))
        self.shifted += seconds
        self.send_signal(_signal.SIGUSR2)
        expected = repr(self.shifted)
        eventually(
            lambda: self.ack_file.exists() and self.ack_file.read_text() == expected,
            10,
            what=f"the proxy's clock {self.shifted:g} s ahead",
        )
