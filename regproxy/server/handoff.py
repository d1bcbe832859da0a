"""The sockets a ``--workers`` supervisor binds and hands to its workers.

The supervisor learns what each listener description binds by letting Twisted's own
parser run against a recording stand-in for the reactor (``listen_request``), binds it
once (``bind``), and passes the descriptors to each worker at fixed numbers; the worker
learns which is which from its ``--as-worker`` argument (``WorkerSpec``).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import attrs
from twisted.internet import protocol
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure
from zope.interface import implementer

# A worker's inherited listeners start here, after stdin, stdout and stderr.
FIRST_CHILD_FD = 3


@attrs.frozen
class ListenRequest:
    """What an endpoint would have asked the reactor for, learnt by parsing its description.

    ``kind`` is ``tcp`` (``tcp:``, ``tcp6:``), ``ssl`` (with its ``context_factory``), or
    ``adopted`` (``systemd:``: ``fd`` is our own duplicate of the inherited descriptor).
    """

    kind: str
    port: int = 0
    interface: str = ""
    backlog: int = 50
    context_factory: Any = None
    fd: int | None = None


@implementer(IListeningPort)
class _NotListening:
    """What the recorder hands back to the endpoint: nothing is listening yet."""

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        pass

    def getHost(self) -> Any:
        return None


class _Recorder:
    """Takes the reactor's place while an endpoint description is parsed and listened on,
    and records the call instead of making it: Twisted's own parser stays the one reading
    descriptions (options, certificate files) without any private API."""

    def __init__(self) -> None:
        self.requests: list[ListenRequest] = []

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> _NotListening:
        self.requests.append(ListenRequest("tcp", port, interface, backlog))
        return _NotListening()

    def listenSSL(
        self,
        port: int,
        factory: Any,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> _NotListening:
        self.requests.append(ListenRequest("ssl", port, interface, backlog, contextFactory))
        return _NotListening()

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: Any) -> Any:
        # The endpoint closes the inherited descriptor right after this call.
        self.requests.append(ListenRequest("adopted", fd=os.dup(fileDescriptor)))
        return _NotListening()


class UnsharedListener(ValueError):
    """A listener kind the supervisor cannot hand to its workers (``unix:``, ...)."""


def listen_request(description: str) -> ListenRequest:
    recorder = _Recorder()
    failures: list[Failure] = []
    endpoint = serverFromString(recorder, description)
    try:
        endpoint.listen(protocol.Factory()).addErrback(failures.append)
    except AttributeError:  # a reactor method the recorder lacks (listenUNIX, ...)
        failures.append(Failure())
    if failures:
        if failures[0].check(AttributeError):
            raise UnsharedListener(
                f"{description!r}: with --workers above 1, use tcp:, ssl: or systemd: listeners"
            )
        failures[0].raiseException()
    return recorder.requests[0]


def bind(request: ListenRequest) -> socket.socket:
    """A listening socket for *request*, bound as Twisted's ``listenTCP`` would bind it."""
    if request.kind == "adopted":
        assert request.fd is not None
        return socket.socket(fileno=request.fd)
    family = socket.AF_INET6 if ":" in request.interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((request.interface, request.port))
        sock.listen(request.backlog)
    except OSError as error:
        sock.close()
        raise CannotListenError(request.interface, request.port, error) from None
    return sock


@attrs.frozen
class Inherited:
    """A listening socket a worker inherited: its kind (``tcp``, ``ssl``, ``adopted``) and
    its descriptor number in the worker."""

    kind: str
    fd: int


@attrs.frozen
class WorkerSpec:
    """What the supervisor tells a worker (``--as-worker``): its number, the supervisor's
    pid, the inherited listeners in the order of ``--port`` then ``--metrics-port``, and
    ``runtime_dir``, the supervisor's runtime directory (``runtime_dir.RuntimeDirectory``):
    one writable directory every worker of the supervisor shares, removed when it exits."""

    number: int
    supervisor: int
    listeners: tuple[Inherited, ...]
    runtime_dir: str = ""

    def argument(self) -> str:
        fds = ",".join(f"{one.kind}={one.fd}" for one in self.listeners)
        # The path last: it is the one part that may hold a colon.
        return f"{self.number}:{self.supervisor}:{fds}:{self.runtime_dir}"

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        try:
            number, supervisor, fds, *rest = text.split(":", 3)
            runtime_dir = rest[0] if rest else ""
            listeners = tuple(
                Inherited(kind, int(fd))
                for kind, fd in (item.split("=") for item in fds.split(",") if item)
            )
            return cls(int(number), int(supervisor), listeners, runtime_dir)
        except ValueError:
            raise ValueError("set only by the --workers supervisor") from None
