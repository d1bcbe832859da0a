"""Learning an upstream's token realm from its own challenge, on demand."""

from __future__ import annotations

import attrs
from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .. import challenge
from ..bodies import read_bounded
from ..config import Route
from ..errors import OCIError

CHALLENGE_BODY_LIMIT = 64 * 1024


def usable_realm(route: Route, url: str) -> bool:
    """An http(s) URL, and https whenever the upstream itself is reached over https:
    the proxy may send its credentials there, and the client its own."""
    if route.upstream.scheme == "https":
        return url.startswith("https://")
    return url.startswith(("https://", "http://"))


@attrs.frozen
class Realm:
    url: str
    service: str | None


class RealmCache:
    """The realm comes from the upstream's ``/v2/`` challenge, never from a client.

    It is learnt when first needed (the proxy starts while the upstream is down) and kept
    until a token request fails, then learnt again. Every replica learns the same answer,
    so nothing here breaks behind a load balancer.
    """

    log = Logger()

    def __init__(self, client: HTTPClient, clock: IReactorTime, timeout: float) -> None:
        self._client = client
        self._clock = clock
        self._timeout = timeout
        # Only realms actually found are kept: a 5xx or a load balancer's page answering
        # /v2/ once must not switch token auth off until the next restart.
        self._realms: dict[str, Realm] = {}

    async def realm(self, route: Route) -> Realm | None:
        known = self._realms.get(route.name)
        if known is not None:
            return known
        try:
            response = await self._client.get(
                route.upstream.origin + "/v2/",
                allow_redirects=False,
                unbuffered=True,
                timeout=self._timeout,
                reactor=self._clock,  # type: ignore[arg-type]
            )
            values = [
                v.decode("latin-1")
                for v in response.headers.getRawHeaders(b"www-authenticate", [])
            ]
            await read_bounded(response, CHALLENGE_BODY_LIMIT, self._clock, self._timeout)
        except Exception:
            raise OCIError(
                "UPSTREAM_UNAVAILABLE", "the upstream registry cannot be reached"
            ) from None
        realm = None
        for item in challenge.parse_all(values):
            url = item.get("realm")
            if item.is_bearer and url and usable_realm(route, url):
                realm = Realm(url, item.get("service"))
                break
        if realm is None:
            self.log.warn(
                "route {route}: upstream /v2/ answered {status} without a usable Bearer realm",
                route=route.name,
                status=response.code,
            )
            return None
        self.log.info(
            "route {route}: upstream token realm is {realm}", route=route.name, realm=url
        )
        self._realms[route.name] = realm
        return realm

    def forget(self, route: Route) -> None:
        self._realms.pop(route.name, None)
