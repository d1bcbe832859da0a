"""Stop signals: SIGTERM as a clean stop, each stop taken once, and the signals a worker
holds until it can take them (SIGHUP is ``reload``'s, or ``worker``'s).

SIGTERM as a clean stop: exit status 0 once the drain has run.

twist's reactor handles SIGTERM by stopping and then, after the reactor has stopped, kills
itself with the same signal, so every ``systemctl stop`` or pod deletion would end with
status 143 (or -15), which supervisors and CI count as a failure. The only way to tell twist
otherwise is a private reactor attribute (``_exitSignal``). Instead, once the reactor runs,
regproxy installs its own SIGTERM handler (the standard ``signal`` module), which stops the
reactor the same way without recording the signal. SIGINT keeps Twisted's handling.
The exit status is 0 also when the grace period ended with transfers cut short; the log
says so ("grace period over with N requests unfinished").
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

# Held (blocked) from a ``--workers`` worker's start until its handlers are in place: a
# worker still importing would otherwise die of them instead of stopping cleanly (blocked
# signals stay pending across exec, and the mask is inherited).
HELD_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


class StopCleanlyOnSigterm(Service):
    log = Logger()

    def __init__(self, reactor: Any, *, deafen: Callable[[], None] | None = None) -> None:
        self.reactor = reactor
        self.stopping = False
        # What makes the process deaf to further stop signals (tests pass their own: the
        # real one would leave the test runner ignoring Ctrl-C).
        self.deafen = deafen if deafen is not None else stop_hearing_stop_signals

    def startService(self) -> None:
        super().startService()
        # Signal handlers belong to the main thread; elsewhere (tests) there is nothing to do.
        if threading.current_thread() is threading.main_thread():
            self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        signal.signal(signal.SIGTERM, self.sigterm)

    def sigterm(self, number: int, frame: FrameType | None = None) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.deafen()
        self.log.info("Received SIGTERM, shutting down.")
        self.reactor.callFromThread(self.reactor.stop)


def stop_hearing_stop_signals() -> None:
    """The process is stopping: further SIGTERM and SIGINT are ignored by the kernel.

    A handler of ours ignores them too, but Python puts the default action back while the
    interpreter shuts down (for every signal with a Python handler): a worker that heard
    the stop directly and then, through the supervisor, once more during its last
    moments, was killed by it and counted as unclean. An ignored signal stays ignored.
    """
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)


def ignore_repeated_stop_signals() -> None:
    """Let only the first SIGTERM or SIGINT reach the reactor's handler (once it runs).

    A service manager that signals the whole process group (systemd's default
    KillMode=control-group, Ctrl-C in a terminal) reaches each worker twice: directly and
    through the supervisor. A second stop would make the reactor log ReactorNotRunning
    and exit by the signal even after a clean drain.
    """
    stopping = False

    def wrap(previous: Callable[[int, Any], Any]) -> Callable[[int, Any], None]:
        def handler(signum: int, frame: Any) -> None:
            nonlocal stopping
            if not stopping:
                stopping = True
                stop_hearing_stop_signals()
                previous(signum, frame)

        return handler

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if callable(previous):
            signal.signal(signum, wrap(previous))
