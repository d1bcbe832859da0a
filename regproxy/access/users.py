"""The htpasswd users: passwords checked with bcrypt, away from the reactor thread.

bcrypt is slow on purpose (tens of milliseconds): every check runs in a thread. A user
name that is not in the file is checked against a dummy hash of the same cost, so the time
taken and the answer are the same whether or not the user exists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import bcrypt
from twisted.internet.defer import Deferred

# Runs a blocking call away from the reactor thread and fires with its result.
RunBlocking = Callable[[Callable[[], bool]], "Deferred[bool]"]
# What an unknown user's password is compared with: a hash no password matches in
# practice; made once per process at the common cost (htpasswd -B uses 5, most tools 10+).
_DUMMY_COST = 10
_dummies: dict[int, bytes] = {}


def _cost(hashed: bytes) -> int:
    try:
        return int(hashed[4:6])
    except ValueError:
        return _DUMMY_COST


def dummy_hash(cost: int) -> bytes:
    if cost not in _dummies:
        _dummies[cost] = bcrypt.hashpw(b"\0not a password", bcrypt.gensalt(cost))
    return _dummies[cost]


class Users:
    """The user names of one htpasswd file and a way to check their passwords."""

    def __init__(self, hashes: Mapping[str, bytes], run_blocking: RunBlocking) -> None:
        self._hashes = dict(hashes)
        self._run = run_blocking
        # Unknown users cost what the file's users cost (the most common cost among them).
        costs = [_cost(hashed) for hashed in self._hashes.values()]
        self._dummy_cost = max(set(costs), key=costs.count) if costs else _DUMMY_COST

    def __contains__(self, name: object) -> bool:
        return name in self._hashes

    def mark(self, name: str) -> str:
        """A short fingerprint of the user's hash: refresh tokens carry it, so a changed
        password (or a removed user) ends them. Not the hash: it cannot be attacked."""
        hashed = self._hashes.get(name, b"")
        return hashlib.sha256(b"regproxy refresh mark\0" + hashed).hexdigest()[:16]

    def check(self, name: str, password: str) -> Deferred[bool]:
        hashed = self._hashes.get(name)
        cost = self._dummy_cost
        # bcrypt reads 72 bytes (htpasswd and Apache cut there too; bcrypt 5 refuses more).
        secret = password.encode("utf-8")[:72]

        def compare() -> bool:
            candidate = hashed if hashed is not None else dummy_hash(cost)
            try:
                matched = bcrypt.checkpw(secret, candidate)
            except ValueError:
                matched = False
            return matched and hashed is not None

        return self._run(compare)
