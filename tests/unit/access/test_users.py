"""htpasswd users: bcrypt in a thread, the same answer and cost for unknown users."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bcrypt
from twisted.internet.defer import Deferred, succeed

from regproxy.access.users import Users
from tests.unit.access.gates import HASHES, PASSWORDS, at_once


def checked(users: Users, name: str, password: str) -> bool:
    result: list[bool] = []
    users.check(name, password).addCallback(result.append)
    return result[0]


def test_the_right_password_passes_and_a_wrong_one_fails() -> None:
    users = Users(HASHES, at_once)
    assert checked(users, "alice", PASSWORDS["alice"])
    assert not checked(users, "alice", PASSWORDS["bob"])
    assert not checked(users, "alice", "")


def test_an_unknown_user_is_refused_after_a_bcrypt_comparison_of_the_same_cost() -> None:
    compared: list[bytes] = []
    real = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        compared.append(hashed)
        return real(password, hashed)

    users = Users(HASHES, at_once)
    original = bcrypt.checkpw
    bcrypt.checkpw = spy  # type: ignore[assignment]
    try:
        assert not checked(users, "mallory", PASSWORDS["alice"])
        assert checked(users, "alice", PASSWORDS["alice"])
    finally:
        bcrypt.checkpw = original  # type: ignore[assignment]
    assert len(compared) == 2
    # Same cost as the file's entries: the time does not tell the user exists.
    assert compared[0][:7] == HASHES["alice"][:7]


def test_a_dummy_hash_is_no_password_of_an_unknown_user() -> None:
    users = Users(HASHES, at_once)
    assert not checked(users, "mallory", "\0not a password")


def test_checks_run_where_the_runner_says() -> None:
    """bcrypt never runs on the reactor thread: only inside the runner's call."""
    ran: list[Callable[[], Any]] = []

    def later(work: Callable[[], Any]) -> Deferred[Any]:
        ran.append(work)
        return Deferred()

    users = Users(HASHES, later)
    pending = users.check("alice", PASSWORDS["alice"])
    assert not pending.called and len(ran) == 1
    assert ran[0]() is True


def test_long_passwords_are_cut_at_72_bytes_as_htpasswd_does() -> None:
    long = "p" * 100
    users = Users({"dave": bcrypt.hashpw(long.encode()[:72], bcrypt.gensalt(4))}, at_once)
    assert checked(users, "dave", long)


def test_the_refresh_mark_changes_with_the_password() -> None:
    before = Users(HASHES, at_once).mark("alice")
    after = Users({"alice": bcrypt.hashpw(b"new", bcrypt.gensalt(4))}, at_once).mark("alice")
    assert before != after and HASHES["alice"].decode() not in before


def test_membership() -> None:
    users = Users(HASHES, lambda work: succeed(work()))
    assert "alice" in users and "mallory" not in users
