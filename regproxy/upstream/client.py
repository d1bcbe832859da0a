"""The one way regproxy talks to an upstream: forwarding, ``/_token``, realm discovery,
the proxy's own token fetches and the start-up check all send through :class:`UpstreamClient`.

It owns what each of those would otherwise get subtly different: treq's options (pooled,
unbuffered, no automatic redirects, no cookies), the User-Agent, the header timeout, bounded
reads of small bodies, and the classification of failures by exception type into a
:class:`FailureKind`, so every caller answers a dead upstream the same way (502, or 504 for
a timeout) and tells a client that left apart from an upstream that failed.
"""

from __future__ import annotations

import enum
import ssl
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import attrs
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from ..protocol.errors import OCIError
from . import reading


class FailureKind(enum.Enum):
    """Why an upstream exchange failed; the value is what logs and metrics show."""

    def __str__(self) -> str:
        return str(self.value)

    CONNECT = "connect"  # refused, unreachable, reset before an answer
    DNS = "dns"
    TLS = "tls"  # handshake or certificate verification
    TIMEOUT = "timeout"  # no response headers in time
    PROTOCOL = "protocol"  # the connection broke or the answer was malformed
    IDLE = "idle"  # a body stalled
    REDIRECT_REFUSED = "redirect_refused"  # follow mode refused a redirect target


class RedirectRefused(Exception):
    """A blob redirect target the proxy will not fetch; the message says why."""


@attrs.frozen(eq=False)
class UpstreamFailure(Exception):
    """An upstream exchange that failed, classified; ``cause`` is safe to log and show."""

    kind: FailureKind
    cause: str

    def oci(self) -> OCIError:
        if self.kind is FailureKind.TIMEOUT or self.kind is FailureKind.IDLE:
            return OCIError(
                "UPSTREAM_TIMEOUT",
                "the upstream registry did not answer in time",
                kind=str(self.kind),
            )
        if self.kind is FailureKind.REDIRECT_REFUSED:
            return OCIError(
                "UPSTREAM_UNAVAILABLE",
                "the upstream redirected to a target the proxy does not fetch",
                {"reason": self.cause},
                kind=str(self.kind),
            )
        return OCIError(
            "UPSTREAM_UNAVAILABLE",
            "the upstream registry cannot be reached",
            {"reason": str(self.kind)},
            kind=str(self.kind),
        )


def _reasons(error: BaseException) -> Iterable[BaseException]:
    """The error itself and, for Twisted's wrapper exceptions, every wrapped one."""
    yield error
    for reason in getattr(error, "reasons", None) or ():
        value = reason.value if isinstance(reason, Failure) else reason
        if isinstance(value, BaseException):
            yield from _reasons(value)


def _tls_errors() -> tuple[type[BaseException], ...]:
    # ssl.SSLError: regproxy's own TLS to upstreams (regproxy.upstream._tls); SSL.Error:
    # pyOpenSSL's, should a Twisted TLS layer sit under a connection.
    kinds: list[type[BaseException]] = [ssl.SSLError, SSL.Error]
    try:
        from service_identity.exceptions import VerificationError as ServiceIdentityError

        kinds.append(ServiceIdentityError)
    except ImportError:  # pragma: no cover - service_identity is a dependency
        pass
    from twisted.internet.ssl import VerificationError as TwistedVerificationError

    kinds.append(TwistedVerificationError)
    return tuple(kinds)


TLS_ERRORS = _tls_errors()


def is_cancellation(error: BaseException) -> bool:
    """Whether the exchange ended because somebody cancelled it (a departed client)."""
    return any(
        isinstance(reason, (CancelledError, neterror.ConnectingCancelledError))
        for reason in _reasons(error)
    )


def classify(error: BaseException) -> tuple[FailureKind, str]:
    """The failure kind and a loggable cause, by exception type (never by message text)."""
    reasons = list(_reasons(error))
    for reason in reasons:
        if isinstance(reason, RedirectRefused):
            return FailureKind.REDIRECT_REFUSED, str(reason)
        if isinstance(reason, TLS_ERRORS):
            return FailureKind.TLS, "TLS handshake or certificate verification failed"
        if isinstance(reason, neterror.DNSLookupError):
            return FailureKind.DNS, "the host name does not resolve"
    for reason in reasons:
        if isinstance(reason, (neterror.TimeoutError, neterror.TCPTimedOutError)):
            return FailureKind.TIMEOUT, "the connection timed out"
        if isinstance(reason, neterror.ConnectionRefusedError):
            return FailureKind.CONNECT, "connection refused"
        if isinstance(reason, neterror.ConnectError):
            return FailureKind.CONNECT, f"cannot connect ({type(reason).__name__})"
    if isinstance(error, ResponseFailed):
        names = ", ".join(sorted({type(r).__name__ for r in reasons[1:]})) or "unknown"
        return FailureKind.PROTOCOL, f"the connection failed before a complete answer ({names})"
    return FailureKind.PROTOCOL, f"the request failed ({type(error).__name__})"


class HealthObserver(Protocol):
    """Told of every upstream outcome per route (logs and metrics of upstream health)."""

    def failed(self, route: str, kind: FailureKind, cause: str) -> None: ...

    def succeeded(self, route: str) -> None: ...


class _IgnoreHealth:
    def failed(self, route: str, kind: FailureKind, cause: str) -> None:
        pass

    def succeeded(self, route: str) -> None:
        pass


class UpstreamClient:
    """Sends requests upstream and reads small answers; see the module docstring."""

    def __init__(
        self,
        http: HTTPClient,
        *,
        clock: IReactorTime,
        timeout: float,
        idle_timeout: float,
        health: HealthObserver | None = None,
        per_route: Mapping[str, HTTPClient] | None = None,
    ) -> None:
        self._http = http
        # Routes with a TLS trust of their own (upstream_ca) have a client of their own.
        self._per_route = dict(per_route or {})
        self.clock = clock
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self._health: HealthObserver = health or _IgnoreHealth()

    async def send(
        self,
        method: str,
        url: str,
        *,
        headers: Headers,
        route: str,
        body: bytes | None = None,
        http: HTTPClient | None = None,
    ) -> IResponse:
        """The upstream's response, headers read, body not yet.

        Raises :class:`UpstreamFailure` for a failed exchange and ``CancelledError`` when the
        caller cancelled (its client left): the two must never be confused, so the header
        timeout is this method's own timer rather than treq's ``timeout=``, which cancels
        the same way a departing client does.
        """
        try:
            client = http or self._per_route.get(route, self._http)
            sending = client.request(
                method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                unbuffered=True,
                reactor=self.clock,  # type: ignore[arg-type]
            )
        except Exception as error:
            # treq refuses some URLs (a malformed port) before any I/O.
            failure = UpstreamFailure(
                FailureKind.PROTOCOL, f"unusable URL ({type(error).__name__})"
            )
            self._health.failed(route, failure.kind, failure.cause)
            raise failure from None
        timed_out = False

        def time_out() -> None:
            nonlocal timed_out
            timed_out = True
            sending.cancel()

        timer = self.clock.callLater(self.timeout, time_out)
        try:
            response: IResponse = await sending
        except Exception as error:
            if timed_out:
                failure = UpstreamFailure(
                    FailureKind.TIMEOUT, f"no response headers within {self.timeout:g} s"
                )
            elif is_cancellation(error):
                raise CancelledError() from None
            else:
                failure = UpstreamFailure(*classify(error))
            self._health.failed(route, failure.kind, failure.cause)
            raise failure from None
        finally:
            if timer.active():
                timer.cancel()
        self._health.succeeded(route)
        return response

    async def read(self, response: IResponse, limit: int) -> bytes:
        """A small body in full, failing past ``limit`` bytes or when it stalls."""
        try:
            return await reading.read_bounded(response, limit, self.clock, self.idle_timeout)
        except OCIError:
            raise
        except Exception as error:
            if is_cancellation(error):
                raise
            raise UpstreamFailure(*classify(error)).oci() from None

    async def fetch(
        self, method: str, url: str, *, headers: Headers, route: str, limit: int, **kw: Any
    ) -> tuple[IResponse, bytes]:
        """Send and read a small answer whole (challenges, tokens, lists, errors)."""
        response = await self.send(method, url, headers=headers, route=route, **kw)
        return response, await self.read(response, limit)

    @staticmethod
    def discard(response: IResponse) -> None:
        """Read off a body nobody needs, so the pooled connection can be reused."""
        response.deliverBody(reading.Discard())

    @staticmethod
    def abandon(response: IResponse) -> None:
        """Close the connection without reading the body (a large or malformed one)."""
        response.deliverBody(reading.Abandon())

    @staticmethod
    def known_length(response: IResponse) -> int | None:
        return None if response.length is UNKNOWN_LENGTH else int(response.length)
