"""Where the proxy's own upstream credentials come from.

Each source yields, when asked, the basic credentials (username, password) the proxy
presents to the upstream registry or its token realm, or a static Authorization value.
Secrets live only in these objects; ``repr`` and logs show a description, never a value.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from ..config import Credentials

GOOGLE_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
# Runs a blocking call away from the reactor thread.
RunInThread = Callable[[Callable[[], None]], Deferred[None]]
# Refresh this long before a Google access token expires, so no request carries a token
# that dies on the way.
GOOGLE_REFRESH_MARGIN = datetime.timedelta(minutes=5)


def basic_header(username: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{username}:{password}".encode())


class CredentialSource(Protocol):
    description: str

    async def authorization(self) -> bytes:
        """The Authorization value for the registry (Basic) or its token realm."""


class StaticHeader:
    """AUTH_HEADER: sent as it is, as the original did."""

    def __init__(self, value: str) -> None:
        self._value = value.encode("latin-1")
        self.description = "static Authorization header"

    async def authorization(self) -> bytes:
        return self._value


class BasicCredentials:
    def __init__(self, username: str, password: str) -> None:
        self._header = basic_header(username, password)
        self.description = f"basic credentials of {username}"

    async def authorization(self) -> bytes:
        return self._header


class AnonymousTokens:
    """No credentials, yet the proxy answers the upstream's token challenges itself: with
    access control ([auth]) the client's credentials are the proxy's own and never go
    upstream, so the anonymous token dance is the proxy's to do."""

    description = "anonymous token requests"

    async def authorization(self) -> bytes:
        return b""


class GoogleAccessTokens:
    """Google OAuth2 access tokens, sent as ``oauth2accesstoken`` basic credentials.

    google-auth refreshes with blocking HTTP, so refreshes run in a thread, one at a time
    (concurrent requests wait for the same refresh), and start ``GOOGLE_REFRESH_MARGIN``
    before expiry.
    """

    log = Logger()

    def __init__(
        self,
        make_credentials: Callable[[], Any],
        description: str,
        now: Callable[[], datetime.datetime] | None = None,
        run_in_thread: RunInThread = deferToThread,
    ) -> None:
        self._make_credentials = make_credentials
        self._run_in_thread = run_in_thread
        self._credentials: Any = None
        self._lock = DeferredLock()
        self._now = now or (
            lambda: datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        )
        self.description = description
        self.refreshes = 0

    def _fresh(self) -> bool:
        credentials = self._credentials
        if credentials is None or not credentials.token:
            return False
        expiry = credentials.expiry
        return expiry is None or self._now() < expiry - GOOGLE_REFRESH_MARGIN

    async def authorization(self) -> bytes:
        if not self._fresh():
            await self._lock.acquire()
            try:
                if not self._fresh():
                    await self._run_in_thread(self._refresh)
            finally:
                self._lock.release()
        return basic_header("oauth2accesstoken", self._credentials.token)

    def _refresh(self) -> None:
        """Runs in a thread: it blocks on the metadata server or the token endpoint."""
        import google.auth.transport.requests

        if self._credentials is None:
            self._credentials = self._make_credentials()
        self._credentials.refresh(google.auth.transport.requests.Request())
        self.refreshes += 1
        self.log.info("refreshed Google access token ({source})", source=self.description)


def google_key_file(path: str, run_in_thread: RunInThread = deferToThread) -> GoogleAccessTokens:
    def make() -> Any:
        from google.oauth2 import service_account

        return service_account.Credentials.from_service_account_file(path, scopes=GOOGLE_SCOPES)

    return GoogleAccessTokens(make, f"Google key file {path}", run_in_thread=run_in_thread)


def google_adc(run_in_thread: RunInThread = deferToThread) -> GoogleAccessTokens:
    def make() -> Any:
        import google.auth

        credentials, _ = google.auth.default(scopes=GOOGLE_SCOPES)
        return credentials

    return GoogleAccessTokens(
        make, "Google application default credentials", run_in_thread=run_in_thread
    )


def google_json_key(path: str) -> BasicCredentials:
    """The original's form: the key file itself as ``_json_key`` basic credentials."""
    with open(path, encoding="utf-8") as handle:
        source = BasicCredentials("_json_key", handle.read())
    source.description = f"_json_key from {path}"
    return source


def credential_source(
    credentials: Credentials, run_in_thread: RunInThread = deferToThread
) -> CredentialSource | None:
    """The route's credential source; ``run_in_thread`` runs blocking refreshes (the
    service hands in its reactor's thread pool, tests a runner of their own)."""
    if credentials.auth_header:
        return StaticHeader(credentials.auth_header)
    if credentials.username and credentials.password is not None:
        return BasicCredentials(credentials.username, credentials.password)
    if credentials.google_key_file and credentials.google_json_key:
        return google_json_key(credentials.google_key_file)
    if credentials.google_key_file:
        return google_key_file(credentials.google_key_file, run_in_thread)
    if credentials.google_adc:
        return google_adc(run_in_thread)
    return None
