"""An OIDC issuer's keys, fetched from its discovery document and JWKS and cached.

A refresh reads ``<issuer>/.well-known/openid-configuration`` and then its ``jwks_uri``.
The discovery document is read on every refresh (at most once a minute), so an issuer
that moves its keys is followed; its ``issuer`` must be the configured one exactly
(OpenID Connect Discovery 1.0, 4.3), and its ``jwks_uri`` must be https. The JWKS may
live on another host than the issuer (Google's and a Kubernetes API server's do): the
document that names it came from the issuer over verified TLS, so whoever could point it
elsewhere already controls the issuer.

The keys are kept for the JWKS response's ``Cache-Control: max-age`` (less its ``Age``),
held between :data:`MIN_CACHE` and :data:`MAX_CACHE`. A token naming a key the set does
not hold causes a refresh, at most once per :data:`MIN_CACHE`: tokens with made-up key
ids cannot turn the proxy into a load on the issuer. A refresh that fails keeps the keys
already held; with none held, verification is refused until a refresh succeeds (tried
again after :data:`RETRY_WITHOUT_KEYS`). Concurrent verifications share one refresh.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from ..upstream.reading import Abandon, read_bounded
from ..upstream.singleflight import SingleFlight
from ._jwks import KeySet, OIDCRefused, parse_key_set

MIN_CACHE = 60.0  # also the least time between two refreshes
MAX_CACHE = 86400.0
DEFAULT_CACHE = 900.0  # a JWKS response without max-age
RETRY_WITHOUT_KEYS = 5.0
FETCH_TIMEOUT = 10.0  # a whole refresh: discovery and JWKS, connections included
MAX_DOCUMENT = 1 << 20  # bytes of a discovery document or JWKS

HttpGet = Callable[..., Any]  # treq's HTTPClient.get: (url, **kwargs) -> Deferred[IResponse]


def discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def cache_lifetime(headers: Headers) -> float:
    """Seconds a JWKS response may be used, from its Cache-Control and Age headers."""
    lifetime = DEFAULT_CACHE
    for value in headers.getRawHeaders(b"cache-control", []):
        for directive in value.decode("latin-1").lower().split(","):
            name, _, argument = directive.strip().partition("=")
            if name in ("no-store", "no-cache"):
                return MIN_CACHE
            if name == "max-age":
                try:
                    lifetime = float(int(argument.strip().strip('"')))
                except ValueError:
                    continue
    for value in headers.getRawHeaders(b"age", [])[:1]:
        with contextlib.suppress(ValueError):
            lifetime -= max(0, int(value))
    return min(max(lifetime, MIN_CACHE), MAX_CACHE)


class IssuerKeys:
    """The verification keys of one issuer, as fresh as its cache headers ask."""

    log = Logger()

    def __init__(
        self,
        issuer: str,
        *,
        get: HttpGet,
        clock: IReactorTime,
        timeout: float = FETCH_TIMEOUT,
        limit: int = MAX_DOCUMENT,
    ) -> None:
        self.issuer = issuer
        self._get = get
        self._clock = clock
        self._timeout = timeout
        self._limit = limit
        self._keys: KeySet | None = None
        self._expires = 0.0
        self._last_attempt: float | None = None
        self._last_failure = "no key fetched yet"
        self._fetching = False
        self._flight: SingleFlight[str, None] = SingleFlight()

    async def key_set(self, kid: str | None) -> KeySet:
        """The key set to verify a token naming ``kid`` with: refreshed first when it has
        expired or does not know ``kid``, as often as the limits above allow."""
        now = self._clock.seconds()
        if self._fetching or (
            (self._keys is None or now >= self._expires or not self._keys.knows(kid))
            and self._may_fetch(now)
        ):
            await self._refresh()
        if self._keys is None:
            raise OIDCRefused(f"no keys from the issuer: {self._last_failure}")
        return self._keys

    def _may_fetch(self, now: float) -> bool:
        if self._last_attempt is None:
            return True
        spacing = RETRY_WITHOUT_KEYS if self._keys is None else MIN_CACHE
        return now - self._last_attempt >= spacing

    async def _refresh(self) -> None:
        """Join the refresh under way, or start one; a failure is remembered (and logged
        once), not raised: the keys held, if any, stay in use."""
        await self._flight.run("keys", self._fetch_and_keep)

    async def _fetch_and_keep(self) -> None:
        self._fetching = True
        self._last_attempt = self._clock.seconds()
        fetch = ensureDeferred(self._fetch())
        # The whole refresh has a deadline. Cancelling it shows up as whatever the layer
        # cancelled says (treq: ResponseNeverReceived), so the timer itself tells.
        deadline = self._clock.callLater(self._timeout, fetch.cancel)
        try:
            keys, lifetime = await fetch
        except (OIDCRefused, CancelledError) as error:
            if deadline.active() and isinstance(error, OIDCRefused):
                self._failed(error.reason)
            else:
                self._failed(f"no answer within {self._timeout:g} s")
        except Exception:
            # A fault of regproxy's own, not the issuer's: logged with its traceback, and
            # still a refusal for the client, never an unhandled error.
            self.log.failure("OIDC issuer {issuer}: key refresh failed", issuer=self.issuer)
            self._failed("internal error")
        else:
            self._keys = keys
            self._expires = self._clock.seconds() + lifetime
        finally:
            self._fetching = False
            if deadline.active():
                deadline.cancel()

    def _failed(self, reason: str) -> None:
        self._last_failure = reason
        self.log.warn(
            "OIDC issuer {issuer}: key refresh failed ({reason}); {kept}",
            issuer=self.issuer,
            reason=reason,
            kept="keeping the keys held" if self._keys is not None else "no keys held",
        )

    async def _fetch(self) -> tuple[KeySet, float]:
        discovery, _ = await self._document(discovery_url(self.issuer), "discovery document")
        if discovery.get("issuer") != self.issuer:
            raise OIDCRefused("the discovery document names another issuer")
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme != "https":
            raise OIDCRefused("the discovery document has no https jwks_uri")
        document, headers = await self._document(jwks_uri, "JWKS")
        return parse_key_set(document), cache_lifetime(headers)

    async def _document(self, url: str, what: str) -> tuple[dict[str, Any], Headers]:
        """A small JSON object, bounded in size and (by the caller's timeout) in time."""
        body, headers = await self._read(url, what)
        try:
            document = json.loads(body)
        except ValueError:
            raise OIDCRefused(f"the {what} is not JSON") from None
        if not isinstance(document, dict):
            raise OIDCRefused(f"the {what} is not a JSON object")
        return document, headers

    async def _read(self, url: str, what: str) -> tuple[bytes, Headers]:
        try:
            response: IResponse = await self._get(
                url,
                headers={b"accept": [b"application/json"]},
                allow_redirects=False,
                unbuffered=True,
            )
        except CancelledError:
            raise
        except Exception as error:  # any failure to connect is the same to us
            raise OIDCRefused(f"the {what} could not be fetched ({_why(error)})") from None
        if response.code != 200 or (
            response.length is not UNKNOWN_LENGTH and response.length > self._limit
        ):
            response.deliverBody(Abandon())
            if response.code != 200:
                raise OIDCRefused(f"the {what} answered HTTP {response.code}")
            raise OIDCRefused(f"the {what} is larger than {self._limit} bytes")
        try:
            body = await read_bounded(response, self._limit, self._clock, self._timeout)
        except CancelledError:
            raise
        except Exception as error:  # too large, stalled or cut off
            raise OIDCRefused(f"the {what} could not be read ({_why(error)})") from None
        return body, response.headers


def _why(error: Exception) -> str:
    """The name of what went wrong, looking inside Twisted's wrappers (a TLS verification
    failure arrives as ResponseNeverReceived around an SSL error): names only, which
    hold no secret and no text from the other side."""
    reasons = getattr(error, "reasons", None)
    if isinstance(reasons, list) and reasons and isinstance(reasons[0], Failure):
        inner = reasons[0].value
        return f"{type(error).__name__}: {type(inner).__name__}"
    return type(error).__name__
