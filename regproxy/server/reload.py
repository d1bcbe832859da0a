"""SIGHUP: read the routes file again and put the new routes in force.

New requests use the new routes; transfers in flight finish on the routing they started
with (they hold their snapshot). A file that does not load is refused with one log line
naming every problem, and the routes in force stay.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from ..config import ConfigError
from ..routing.load import load_routes
from ..routing.matching import RouteTable
from ..routing.snapshot import CurrentRouting, RoutingFactory


class RoutesReloader(Service):
    log = Logger()

    def __init__(
        self,
        path: str,
        current: CurrentRouting,
        factory: RoutingFactory,
        reactor: Any,
        prepare: Callable[[RouteTable], object] = lambda table: None,
    ) -> None:
        self.path = path
        self.current = current
        self.factory = factory
        self.reactor = reactor
        # Builds what else a table needs before it is in force (the access state): a
        # table it cannot serve is refused like one that does not load.
        self.prepare = prepare
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
        routing = self.factory.build(table)
        try:
            self.prepare(table)
        except Exception as error:
            self.log.error(
                "reload of {path} refused, the routes in force stay: {error}",
                path=self.path,
                error=str(error) or type(error).__name__,
            )
            return False
        self.current.swap(routing)
        return True
