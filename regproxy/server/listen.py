"""Listening sockets that fail in one line and close late enough for load balancers.

``strports.service`` would do the binding, but a port in use then ends ``twist`` with a
traceback, and its listeners close the moment SIGTERM arrives. This service binds with the
public endpoint API, names the option and the fix when that fails, reports the address as
bound, and keeps accepting for ``close_delay`` seconds after it is asked to stop.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from .startup import StartupError

ENDPOINT_HELP = (
    "give a port number or an endpoint such as tcp:8080, tcp:8080:interface=127.0.0.1, "
    "ssl:8443:privateKey=key.pem:certKey=cert.pem or systemd:domain=INET:index=0"
)


def parse_endpoint(
    reactor: Any,
    option: str,
    description: str,
    environ: Mapping[str, str] | None = None,
) -> IStreamServerEndpoint:
    """The endpoint for ``description``, or a StartupError that says what to change.

    ``environ`` is the environment as regproxy started with it: Twisted takes the
    ``LISTEN_*`` variables out of ``os.environ`` when it first reads them.
    """
    handed_over = dict(os.environ if environ is None else environ)
    try:
        endpoint: IStreamServerEndpoint = endpoints.serverFromString(reactor, description)
    except Exception as error:  # any parse failure is a usage problem
        raise endpoint_error(option, description, error, handed_over) from None
    return endpoint


def endpoint_error(
    option: str, description: str, error: Exception, environ: Mapping[str, str]
) -> StartupError:
    """What to say when Twisted's parser refuses ``description`` (here, or in the
    ``--workers`` supervisor, which parses it the same way)."""
    if isinstance(error, (IndexError, KeyError)):
        if description.startswith("systemd:"):
            return StartupError(f"{option} {description}: {_systemd_hint(environ)}")
        return StartupError(f"{option} {description}: {error}; {ENDPOINT_HELP}")
    kind, _, rest = description.partition(":")
    port = rest.split(":", 1)[0]
    if kind in ("tcp", "ssl", "tcp6") and not port.isdigit():
        return StartupError(
            f"{option} {description}: {port!r} is not a port number; {ENDPOINT_HELP}"
        )
    return StartupError(f"{option} {description}: {error}; {ENDPOINT_HELP}")


def _systemd_hint(environ: Mapping[str, str]) -> str:
    """Which half of the socket hand-over is missing."""
    if environ.get("LISTEN_FDS") and not environ.get("LISTEN_FDNAMES"):
        return (
            "the supervisor passed sockets without names (no LISTEN_FDNAMES), and Twisted "
            "adopts named sockets only; name them (FileDescriptorName= in the .socket "
            "unit, --fdname for systemd-socket-activate)"
        )
    return (
        "the supervisor passed no such socket; start regproxy through its .socket unit, "
        "which hands it over (LISTEN_FDS and LISTEN_FDNAMES), or listen on a port of its "
        "own with --port tcp:8080"
    )


def explain_listen_failure(error: BaseException) -> str:
    socket_error = getattr(error, "socketError", None)
    number = getattr(socket_error, "errno", None)
    if number == errno.EADDRINUSE:
        return "the address is already in use: stop what listens there or choose another port"
    if number == errno.EACCES:
        return (
            "permission denied: ports below 1024 need privileges; use a higher port, "
            "or systemd socket activation"
        )
    if number == errno.EADDRNOTAVAIL:
        return "no such local address: check the interface= part"
    if isinstance(error, CannotListenError) and socket_error is not None:
        return str(socket_error)
    return str(error) or type(error).__name__


def is_all_interfaces(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_unspecified
    except ValueError:
        return False


ALL_INTERFACES_WITH_CREDENTIALS = (
    "the proxy holds upstream credentials, so anyone who reaches this port pulls what they "
    "can read; bind one interface (tcp:8080:interface=127.0.0.1) or put access control "
    "in front"
)


def announce(
    log: Logger,
    *,
    host: str | None,
    where: str,
    serves: str,
    option: str,
    description: str,
    warn_all_interfaces: str | None = None,
) -> None:
    """The line saying a listener is bound (by a Listener, or by the ``--workers``
    supervisor for all its workers), and the warning when it is every interface."""
    log.info(
        "listening on {address} ({serves}; {option} {description})",
        address=where,
        serves=serves,
        option=option,
        description=description,
    )
    if host is not None and is_all_interfaces(host) and warn_all_interfaces:
        log.warn(
            "{address} is every interface of this host: {why}",
            address=where,
            why=warn_all_interfaces,
        )


class Listener(Service):
    """Binds ``endpoint`` and says where (``report``; False in a ``--workers`` worker,
    whose supervisor said it once for all)."""

    log = Logger()

    def __init__(
        self,
        *,
        option: str,
        description: str,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        reactor: Any,
        serves: str = "registry API",
        close_delay: float = 0.0,
        warn_all_interfaces: str | None = None,
        report: bool = True,
    ) -> None:
        self.option = option
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.reactor = reactor
        self.serves = serves
        self.close_delay = close_delay
        self.warn_all_interfaces = warn_all_interfaces
        self.report = report
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        """Bind now; a failure before the reactor runs ends twist with one ``Error:`` line.

        TCP, SSL, UNIX and systemd endpoints bind synchronously, before twist starts its
        reactor and its logging, so the process can still exit with a message on stderr.
        """
        super().startService()
        outcome: list[Any] = []
        listening = self.endpoint.listen(self.factory)
        listening.addBoth(outcome.append)
        if outcome:
            self._settle(outcome[0], synchronous=True)
        else:
            listening.addCallback(lambda _: self._settle(outcome[0], synchronous=False))

    def _settle(self, result: IListeningPort | Failure, *, synchronous: bool) -> None:
        if isinstance(result, Failure):
            why = explain_listen_failure(result.value or Exception())
            message = f"{self.option} {self.description}: {why}"
            if synchronous:
                raise SystemExit(f"Error: {message}")
            self.log.critical("Error: {message}", message=message)
            self.reactor.stop()
            return
        self.port = result
        if not self.report:
            return
        address = result.getHost()
        host = getattr(address, "host", None)
        where = f"{host}:{getattr(address, 'port', '')}" if host is not None else str(address)
        announce(
            self.log,
            host=host,
            where=where,
            serves=self.serves,
            option=self.option,
            description=self.description,
            warn_all_interfaces=self.warn_all_interfaces,
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        if not self.close_delay:
            return port.stopListening()
        waited: Deferred[None] = deferLater(self.reactor, self.close_delay, lambda: None)
        return waited.addCallback(lambda _: port.stopListening())
