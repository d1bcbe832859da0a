"""``ssl:`` listeners served by the standard library's TLS (``regproxy.tls.layer``).

Twisted's own ``ssl:`` listener encrypts a blob one 16 KiB record per Python call
through pyOpenSSL (about 1.5 CPU-seconds per GiB here, where nginx spends 0.3); the
standard library's ``ssl.SSLObject`` encrypts each write whole in one C call. The
description keeps Twisted's syntax and meaning: ``ssl:PORT:privateKey=KEY.pem``
``[:certKey=CERT.pem][:interface=ADDR][:backlog=N]``. Twisted's parser still reads it
first (so a bad file or option fails at start-up with Twisted's own message), then the
same files are loaded into an ``ssl.SSLContext``:

- the certificate file may hold the chain after the certificate (``fullchain.pem``), and
  all of it is sent (Twisted's ``ssl:`` sends the first certificate only);
- TLS 1.2 at least, the standard library's server ciphers, no ALPN (clients speak
  HTTP/1.1, as with Twisted's listener), no client certificates asked for.

``extraCertChain`` is sent after the certificate and ``dhParameters`` enables DHE, as
with Twisted; a description with ``sslmethod`` stays on Twisted's TLS, whose method
names have no exact equivalent here.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from zope.interface import implementer

from ..tls.layer import TLSLayer

# Options of Twisted's ``ssl:`` parser, in its positional order after the port.
_POSITIONAL = ("privateKey", "certKey", "sslmethod", "interface", "backlog")
_KNOWN = frozenset({"port", *_POSITIONAL, "extraCertChain", "dhParameters"})
# Options this module serves itself; any other known one (sslmethod) keeps Twisted's TLS.
_SERVED = _KNOWN - {"sslmethod"}


@attrs.frozen
class CertificateFiles:
    """The PEM files an ``ssl:`` listener serves with."""

    private_key: str
    certificate: str
    chain: str | None = None  # extraCertChain: sent after the certificate
    dh_parameters: str | None = None


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """Positional and keyword parts of an endpoint description, as Twisted splits them:
    ``:`` separates parts, the first ``=`` makes a keyword, a backslash escapes either."""
    parts: list[list[str]] = [[""]]
    chars = iter(description)
    for char in chars:
        if char == "\\":
            parts[-1][-1] += next(chars, "")
        elif char == ":":
            parts.append([""])
        elif char == "=" and len(parts[-1]) == 1:
            parts[-1].append("")
        else:
            parts[-1][-1] += char
    args = [part[0] for part in parts if len(part) == 1]
    kwargs = {part[0]: part[1] for part in parts if len(part) == 2}
    return args, kwargs


def served_files(description: str) -> CertificateFiles | None:
    """The files of an ``ssl:`` description this module can serve, else None (another
    kind of listener, or options only Twisted's TLS has)."""
    args, kwargs = split_description(description)
    if not args or args[0] != "ssl":
        return None
    named = dict(zip(("port", *_POSITIONAL), args[1:], strict=False))
    if set(named) & set(kwargs):
        return None  # given twice: leave the verdict to Twisted's parser
    named.update(kwargs)
    if not set(named) <= _KNOWN or not set(named) <= _SERVED:
        return None
    private_key = named.get("privateKey", "server.pem")
    return CertificateFiles(
        private_key,
        named.get("certKey", private_key),
        named.get("extraCertChain"),
        named.get("dhParameters"),
    )


def server_context(files: CertificateFiles) -> ssl.SSLContext:
    """A server context for ``files``; a key that does not match its certificate, or a
    file that holds neither, fails here (``ssl.SSLError``), at start-up."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # A client asking for handshake after handshake (TLS 1.2 renegotiation) costs the
    # server a handshake's CPU each time, for nothing a registry client needs.
    context.options |= ssl.OP_NO_RENEGOTIATION
    if files.chain is None:
        context.load_cert_chain(certfile=files.certificate, keyfile=files.private_key)
    else:
        _load_with_chain(context, files)
    if files.dh_parameters is not None:
        context.load_dh_params(files.dh_parameters)
    return context


def _load_with_chain(context: ssl.SSLContext, files: CertificateFiles) -> None:
    """``load_cert_chain`` reads the chain from the certificate's own file only, so the
    certificate and ``extraCertChain`` go into one file for it: certificates only, all
    public (the key is read from its own file). On Linux the file is an anonymous one in
    memory (``memfd_create``), so a read-only root file system is no obstacle."""
    assert files.chain is not None
    with open(files.certificate, "rb") as certificate, open(files.chain, "rb") as chain:
        pem = certificate.read().rstrip(b"\n") + b"\n" + chain.read()
    if b"-----BEGIN CERTIFICATE-----" not in pem.partition(b"-----END CERTIFICATE-----")[2]:
        raise ssl.SSLError(f"{files.chain!r} holds no PEM certificate")
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        descriptor = memfd_create("regproxy-chain")
        try:
            unwritten = memoryview(pem)
            while unwritten:
                unwritten = unwritten[os.write(descriptor, unwritten) :]
            context.load_cert_chain(f"/proc/self/fd/{descriptor}", files.private_key)
        finally:
            os.close(descriptor)
        return
    with tempfile.TemporaryDirectory(prefix="regproxy-chain-") as directory:
        combined = os.path.join(directory, "chain.pem")
        with open(combined, "wb") as handle:
            handle.write(pem)
        context.load_cert_chain(certfile=combined, keyfile=files.private_key)


class TLSServerFactory(Factory):
    """Wraps each connection of ``wrapped`` (the Site) in the standard library's TLS."""

    noisy = False

    def __init__(self, context: ssl.SSLContext, wrapped: IProtocolFactory) -> None:
        self.context = context
        self.wrapped = wrapped

    def startFactory(self) -> None:
        self.wrapped.doStart()

    def stopFactory(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> TLSLayer | None:
        inner = self.wrapped.buildProtocol(addr)
        if inner is None:
            return None
        return TLSLayer(self.context, inner)


@implementer(IStreamServerEndpoint)
class TLSOver:
    """Listens on ``inner`` (plain TCP, or a socket a worker inherited) with TLS: each
    connection's factory is wrapped by ``wrap`` (the standard library's layer, see
    :func:`stdlib_tls`, or Twisted's ``TLSMemoryBIOFactory`` for what only it serves)."""

    def __init__(
        self,
        inner: IStreamServerEndpoint,
        wrap: Callable[[IProtocolFactory], IProtocolFactory],
    ) -> None:
        self.inner = inner
        self.wrap = wrap

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.inner.listen(self.wrap(protocolFactory))


def stdlib_tls(context: ssl.SSLContext) -> Callable[[IProtocolFactory], IProtocolFactory]:
    """``TLSOver``'s wrapping with the standard library's TLS and ``context``."""
    return lambda factory: TLSServerFactory(context, factory)
