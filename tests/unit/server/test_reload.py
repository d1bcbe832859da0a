"""SIGHUP reload of the routes file: new routes for new requests, a bad file refused with
the routes in force kept."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.logger import formatEvent, globalLogPublisher

from regproxy.config import Config
from regproxy.routing.load import load_routes
from regproxy.server.reload import RoutesReloader
from tests.support.inmemory import Answer, ProxyCase, build_tree

FIRST = """
[[routes]]
name = "one"
upstream = "https://one.example"
"""
SECOND = (
    FIRST
    + """
[[routes]]
name = "two"
upstream = "https://two.example"
path = "two"
"""
)


class ThreadCalls:
    """The one reactor method a signal handler may use, recording instead of running."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callFromThread(self, call: Any) -> None:
        self.calls.append(call)


class ReloadTests(ProxyCase):
    def make_proxy(self, agent: Any, **config: Any) -> None:
        directory = tempfile.mkdtemp(prefix="regproxy-reload-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.file = Path(directory) / "routes.toml"
        self.file.write_text(FIRST)
        table = load_routes(self.file)
        self.config = Config(routes=table.routes, routes_file=str(self.file), **config)
        self.root = build_tree(self.config, agent, self.clock)
        self.proxy = StubTreq(self.root)
        self.reactor = ThreadCalls()
        self.reloader = RoutesReloader(
            str(self.file), self.root.routing, self.root.routing_factory, self.reactor
        )
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_a_table_whose_access_state_cannot_be_built_is_refused(self) -> None:
        def refuse(table: Any) -> None:
            raise ValueError("the limiter's store is unreachable")

        self.reloader.prepare = refuse
        self.file.write_text(SECOND)
        self.assertFalse(self.reloader.reload())
        self.assertEqual([r.name for r in self.root.routing().table.routes], ["one"])

    def test_the_access_state_of_a_reloaded_table_is_built_before_it_is_in_force(
        self,
    ) -> None:
        self.reloader.prepare = self.root.gates
        self.file.write_text(SECOND + "\n[auth]\n")
        self.assertTrue(self.reloader.reload())
        gate = self.root.gates(self.root.routing().table)
        self.assertIsNotNone(gate)
        assert gate is not None
        self.assertTrue(gate.authenticates)

    def test_a_reload_adds_a_route_for_new_requests(self) -> None:
        self.registry.on("/v2/app/manifests/v1", Answer(200, {}, b"{}"))
        self.assertEqual(self.get("/v2/two/app/manifests/v1").status, 404)  # no such repo yet
        before = self.root.routing()
        self.file.write_text(SECOND)
        self.assertTrue(self.reloader.reload())
        self.assertIsNot(self.root.routing(), before)
        self.assertEqual(self.get("/v2/two/app/manifests/v1").status, 200)
        self.assertEqual(self.registry.seen[-1].host, b"two.example")

    def test_an_invalid_file_is_refused_and_the_routes_stay(self) -> None:
        before = self.root.routing()
        self.file.write_text(FIRST + '\n[[routes]]\nname = "one"\nupstream = "x"\nbogus = 1\n')
        self.assertFalse(self.reloader.reload())
        self.assertIs(self.root.routing(), before)
        [line] = [formatEvent(e) for e in self.events if "reload of" in (formatEvent(e) or "")]
        self.assertIn("bogus", line)

    def test_sighup_schedules_the_reload_on_the_reactor(self) -> None:
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        self.file.write_text(SECOND)
        os.kill(os.getpid(), signal.SIGHUP)
        # The handler only schedules: the swap happens on the reactor's thread.
        self.assertEqual(len(self.root.routing().table.routes), 1)
        [call] = self.reactor.calls
        call()
        self.assertEqual(len(self.root.routing().table.routes), 2)
