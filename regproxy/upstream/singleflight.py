"""One run of a piece of work per key at a time, shared by everyone asking meanwhile.

Token fetches, realm discovery and tag revalidation each mean one upstream request for many
concurrent clients. Every caller waits on a Deferred of its own, so a client that leaves
cancels only its own wait, never the work the others share; the waiter is registered
before the work starts, which may finish at once.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class SingleFlight(Generic[K, T]):
    def __init__(self) -> None:
        self._waiting: dict[K, list[Deferred[T]]] = {}

    async def run(self, key: K, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        waiter: Deferred[T] = Deferred()
        if key in self._waiting:
            self._waiting[key].append(waiter)
        else:
            self._waiting[key] = [waiter]
            ensureDeferred(work()).addBoth(self._deliver, key)
        return await waiter

    def _deliver(self, result: T | Failure, key: K) -> None:
        for waiter in self._waiting.pop(key, []):
            if waiter.called:
                continue  # cancelled: its client left
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
