"""Learning an upstream's token realm from its own challenge, on demand."""

from __future__ import annotations

import attrs
from treq.client import HTTPClient
from treq.content import content
from twisted.logger import Logger

from .. import challenge
from ..config import Route
from ..errors import OCIError


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

    def __init__(self, client: HTTPClient, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._realms: dict[str, Realm | None] = {}

    async def realm(self, route: Route) -> Realm | None:
        if route.name in self._realms:
            return self._realms[route.name]
        try:
            response = await self._client.get(
                route.upstream.origin + "/v2/",
                allow_redirects=False,
                unbuffered=True,
                timeout=self._timeout,
            )
        except Exception:
            raise OCIError(
                "UPSTREAM_UNAVAILABLE", "the upstream registry cannot be reached"
            ) from None
        values = [
            v.decode("latin-1") for v in response.headers.getRawHeaders(b"www-authenticate", [])
        ]
        await content(response)
        realm = None
        for item in challenge.parse_all(values):
            url = item.get("realm")
            if item.is_bearer and url and url.startswith(("https://", "http://")):
                realm = Realm(url, item.get("service"))
                break
        self.log.info(
            "route {route}: upstream token realm is {realm}",
            route=route.name,
            realm=realm.url if realm else None,
        )
        self._realms[route.name] = realm
        return realm

    def forget(self, route: Route) -> None:
        self._realms.pop(route.name, None)
