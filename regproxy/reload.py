"""SIGHUP: read the routes file again and put the new routes in force.

New requests use the new routes; transfers in flight finish on the routing they started
with (they hold their snapshot). A file that does not load is refused with one log line
naming every problem, and the routes in force stay.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from .routing.load import load_routes
from .routing.matching import ConfigError
from .routing.snapshot import CurrentRouting, RoutingFactory


class RoutesReloader(Service):
    log = Logger()

    def __init__(
        self, path: str, current: CurrentRouting, factory: RoutingFactory, reactor: Any
    ) -> None:
        self.path = path
        self.current = current
        self.factory = factory
        self.reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        # A signal handler may run between any two bytecodes: it only schedules the
        # reload on the reactor thread, where requests see one routing or the other.
        self._previous = signal.signal(
            signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.reload)
        )

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()

    def reload(self) -> bool:
        """Swap in the file's routes; False (and the old routes kept) when it does not load."""
        try:
            table = load_routes(self.path)
        except ConfigError as error:
            self.log.error(
                "reload of {path} refused, the routes in force stay: {errors}",
                path=self.path,
                errors="; ".join(error.errors),
            )
            return False
        self.current.swap(self.factory.build(table))
        return True
