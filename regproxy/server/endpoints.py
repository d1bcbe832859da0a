"""Which endpoint each listener description gets: parsed in a single process, or the
supervisor's inherited socket in a ``--workers`` worker (wrapped in TLS there for ``ssl:``).
"""

from __future__ import annotations

import functools
import os
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.endpoints import AdoptedStreamServerEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory

from .handoff import WorkerSpec, listen_request
from .listen import parse_endpoint
from .listen_tls import CertificateFiles, TLSOver, served_files, server_context, stdlib_tls
from .startup import StartupError


class ListenerEndpoints:
    """Listening endpoints: parsed from the description in a single process; in a worker,
    the supervisor's sockets, taken in the order the daemon asks for them."""

    def __init__(
        self,
        reactor: Any,
        worker: WorkerSpec | None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.reactor = reactor
        self.worker = worker
        self.environ = environ
        self._taken = 0

    def endpoint(self, option: str, description: str) -> IStreamServerEndpoint:
        if self.worker is None:
            parsed = parse_endpoint(self.reactor, option, description, self.environ)
            files = served_files(description)
            if files is None:
                return parsed
            # The standard library's TLS over the TCP port Twisted's parser read.
            request = listen_request(description)
            tcp = TCP4ServerEndpoint(
                self.reactor, request.port, request.backlog, request.interface
            )
            return TLSOver(tcp, stdlib_tls(_server_context(option, description, files)))
        inherited = self.worker.listeners[self._taken]
        self._taken += 1
        with socket.socket(fileno=os.dup(inherited.fd)) as probe:
            family = probe.family
        adopted: IStreamServerEndpoint = AdoptedStreamServerEndpoint(
            self.reactor, inherited.fd, family
        )
        if inherited.kind == "ssl":
            files = served_files(description)
            wrap: Callable[[IProtocolFactory], IProtocolFactory]
            if files is None:  # options only Twisted's TLS has: as reactor.listenSSL does
                context_factory = listen_request(description).context_factory
                wrap = functools.partial(TLSMemoryBIOFactory, context_factory, False)
            else:
                wrap = stdlib_tls(_server_context(option, description, files))
            adopted = TLSOver(adopted, wrap)
        return adopted


def _server_context(option: str, description: str, files: CertificateFiles) -> ssl.SSLContext:
    try:
        return server_context(files)
    except (OSError, ssl.SSLError) as error:
        raise StartupError(f"{option} {description}: {error}") from None
