"""An in-memory Redis for the rate limits' tests: the server side of ``RESPProtocol``
connections, on a test clock, with the failures a real one has (down, hung, read-only)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from zope.interface import implementer

from regproxy.access._redis import SCRIPT
from regproxy.access._resp import parse


class FakeRedisTransport(StringTransportWithDisconnection):
    """A client's connection: what it writes reaches the fake server at once."""

    def __init__(self, server: FakeRedis) -> None:
        super().__init__()
        self.server = server
        self.db = 0
        self.pending = b""

    def write(self, data: bytes) -> None:
        super().write(data)
        self.pending += data
        if not self.server.hung:
            self.server.serve(self)


class FakeRedis:
    """Keys with expiry on ``clock``; the counting script, AUTH, SELECT, PING.

    ``up`` False refuses connections; ``hung`` accepts them and never answers (a stopped
    server: the kernel still completes the handshake); ``readonly`` refuses writes.
    """

    def __init__(self, clock: Clock, password: bytes | None = None) -> None:
        self.clock = clock
        self.password = password
        self.up = True
        self.hung = False
        self.readonly = False
        self.values: dict[tuple[int, bytes], int] = {}
        self.expiry: dict[tuple[int, bytes], float] = {}
        self.commands: list[list[bytes]] = []
        self.connections: list[FakeRedisTransport] = []

    def stop(self) -> None:
        """Down: open connections are closed, new ones refused."""
        self.up = False
        for transport in self.connections:
            transport.loseConnection()
        self.connections.clear()

    def serve(self, transport: FakeRedisTransport) -> None:
        while transport.pending:
            parsed = parse(transport.pending)
            if parsed is None:
                return
            command, end = parsed
            transport.pending = transport.pending[end:]
            assert isinstance(command, list)
            args = [bytes(arg) for arg in command if isinstance(arg, bytes)]
            self.commands.append(args)
            transport.protocol.dataReceived(self._answer(transport, args))
            if not transport.connected:
                return

    def _answer(self, transport: FakeRedisTransport, args: list[bytes]) -> bytes:
        name = args[0].upper()
        if name == b"AUTH":
            return b"+OK\r\n" if args[-1] == self.password else b"-WRONGPASS wrong pair\r\n"
        if name == b"SELECT":
            transport.db = int(args[1])
            return b"+OK\r\n"
        if name == b"PING":
            return b"+PONG\r\n"
        if name != b"EVAL" or args[1] != SCRIPT or args[2] != b"1":
            return b"-ERR unknown command or script\r\n"
        if self.readonly:
            return b"-READONLY You can't write against a read only replica.\r\n"
        key = (transport.db, args[3])
        now = self.clock.seconds()
        if key in self.expiry and self.expiry[key] <= now:
            del self.values[key], self.expiry[key]
        self.values[key] = self.values.get(key, 0) + 1
        if key not in self.expiry:
            self.expiry[key] = now + int(args[4]) / 1000
        return b":%d\r\n" % self.values[key]

    def count(self, key: bytes, db: int = 0) -> int | None:
        return self.values.get((db, key))


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connects to ``server`` at once (or is refused); ``stall`` makes attempts hang."""

    def __init__(self, server: FakeRedis) -> None:
        self.server = server
        self.stall = False
        self.attempts: list[float] = []
        self.stalled: list[Deferred[IProtocol]] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        self.attempts.append(self.server.clock.seconds())
        if self.stall:
            attempt: Deferred[IProtocol] = Deferred()
            self.stalled.append(attempt)
            return attempt
        if not self.server.up:
            return fail(ConnectionRefusedError("fake refusal"))
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        transport = FakeRedisTransport(self.server)
        transport.protocol = protocol
        self.server.connections.append(transport)
        protocol.makeConnection(transport)
        return succeed(protocol)
