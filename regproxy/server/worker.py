"""A ``--workers`` worker's duties beyond serving its inherited listeners."""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.logger import Logger

from .handoff import WorkerSpec
from .signals import HELD_SIGNALS, ignore_repeated_stop_signals

PARENT_CHECK_INTERVAL = 1.0


class WorkerRole(Service):
    """A worker's duties beyond serving: stop when the supervisor is gone (its sockets must
    not outlive it), and take SIGHUP (forwarded by the supervisor) without dying of it."""

    log = Logger()

    def __init__(
        self, spec: WorkerSpec, reactor: Any, *, signals: bool = True, hangup: bool = True
    ) -> None:
        self.spec = spec
        self.reactor = reactor
        self.signals = signals
        # False when something else (the routes reloader) owns SIGHUP.
        self.hangup = hangup

    def attach(self, parent: MultiService) -> None:
        self.setServiceParent(parent)
        watch = TimerService(PARENT_CHECK_INTERVAL, self._check_parent)
        watch.clock = self.reactor
        watch.setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        if self.signals and self.hangup:
            signal.signal(signal.SIGHUP, self._on_hangup)
        self.reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        if self.signals:
            ignore_repeated_stop_signals()
            # Held since the supervisor started us; any that came meanwhile arrive now.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        self.log.info(
            "worker {worker} (pid {pid}) serving", worker=self.spec.number, pid=os.getpid()
        )

    def _on_hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(
            self.log.info, "worker {worker}: SIGHUP, nothing to reload", worker=self.spec.number
        )

    def _check_parent(self) -> None:
        if os.getppid() != self.spec.supervisor and self.reactor.running:
            self.log.warn(
                "worker {worker}: the supervisor is gone; stopping", worker=self.spec.number
            )
            self.reactor.stop()
