"""Who may read what from the cache: a cache must not become a way around the upstream's
authorization.

* Content is served for repository R only when R is known to hold it (a manifest of R
  listed it, or the upstream served it for R): no repository reads another's by guessing.
* With clients' own credentials passed through, a hit for R is served only to a client the
  upstream accepted for R: a HEAD with the client's credential, remembered for
  ``ACCESS_MEMORY`` seconds per (route, R, hash of the credential), never per repository
  alone.
* A repository the upstream served to an anonymous request is remembered as public for
  ``public_ttl`` seconds, and forgotten at once when the upstream refuses one (401, 403);
  that is the only memory of what anonymous clients may read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorTime

from ..upstream.singleflight import SingleFlight

ACCESS_MEMORY = 60.0
PUBLIC_TTL = 600.0
_MEMORY_LIMIT = 10_000


def credential_key(authorization: bytes | None) -> str:
    return hashlib.sha256(authorization or b"").hexdigest()


ANONYMOUS = credential_key(None)


def accept_key(accepts: Sequence[bytes]) -> str:
    """Which manifest a tag resolves to depends on Accept: one record per set of types."""
    types = sorted(
        {part.split(b";")[0].strip().lower() for v in accepts for part in v.split(b",")}
    )
    return hashlib.sha256(b",".join(types)).hexdigest()[:16]


Repository = tuple[str, str]  # (route, upstream repository name)


class AccessMemory:
    """What the upstream said of which credential may read which repository, for a while."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        access_memory: float = ACCESS_MEMORY,
        public_ttl: float = PUBLIC_TTL,
    ) -> None:
        self.clock = clock
        self.access_memory = access_memory
        self.public_ttl = public_ttl
        self._admitted: dict[tuple[str, str, str], float] = {}
        self._public: dict[Repository, float] = {}
        self._checks: SingleFlight[tuple[str, str, str], bool] = SingleFlight()

    def is_public(self, repository: Repository, credential: str) -> bool:
        """Whether R is known to be readable without credentials, and this client has none."""
        if credential != ANONYMOUS:
            return False
        expiry = self._public.get(repository)
        if expiry is None:
            return False
        if expiry <= self.clock.seconds():
            del self._public[repository]
            return False
        return True

    def learn(self, repository: Repository, credential: str, status: int) -> None:
        """What an upstream answer to this credential says of R being public."""
        if credential != ANONYMOUS:
            return
        if status == 200:
            if len(self._public) > _MEMORY_LIMIT:
                now = self.clock.seconds()
                self._public = {k: t for k, t in self._public.items() if t > now}
            self._public[repository] = self.clock.seconds() + self.public_ttl
        elif status in (401, 403):
            self._public.pop(repository, None)

    def remembered(self, repository: Repository, credential: str) -> bool:
        key = (*repository, credential)
        return self._admitted.get(key, 0.0) > self.clock.seconds()

    def admit(self, repository: Repository, credential: str) -> None:
        """The upstream accepted ``credential`` for R just now. For anonymous clients that
        is what ``learn`` records, with the public TTL: never for longer."""
        if credential == ANONYMOUS:
            return
        now = self.clock.seconds()
        if len(self._admitted) > _MEMORY_LIMIT:
            self._admitted = {k: t for k, t in self._admitted.items() if t > now}
        self._admitted[(*repository, credential)] = now + self.access_memory

    async def check(
        self, repository: Repository, credential: str, ask: Callable[[], Coroutine[Any, Any, bool]]
    ) -> bool:
        """Whether ``credential`` may read R: remembered, public, or the upstream says so
        now (``ask``: one question per credential and repository at a time)."""
        if self.is_public(repository, credential) or self.remembered(repository, credential):
            return True
        return await self._checks.run((*repository, credential), ask)
