"""The caching fetcher through the fetch interface alone: the races and access rules of
issue 17, each pinned by a test that fails when the rule breaks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from regproxy.cache.access import ACCESS_MEMORY
from regproxy.protocol.errors import OCIError
from regproxy.protocol.fetch import Answer
from regproxy.protocol.reference import Kind

from .scripted import (
    BLOB,
    BLOB_DIGEST,
    OCI,
    Collector,
    Harness,
    ScriptedFetcher,
    Sent,
    digest_of,
    manifest,
    ok,
    refused,
)

GOOD = b"Bearer good"
OTHER = b"Bearer other"


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "no result yet"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def by_credential(good: set[bytes | None], body: bytes = BLOB):
    """An upstream that serves ``body`` to the credentials in ``good``, refuses the rest."""

    def answer(sent: Sent) -> Answer:
        if sent.authorization not in good:
            return refused()
        return ok(body, head=sent.method == b"HEAD")

    return answer


@pytest.fixture
def made() -> Iterator[list[Harness]]:
    harnesses: list[Harness] = []
    yield harnesses
    for harness in harnesses:
        harness.close()


def harness(made: list[Harness], answer: Any, **kw: Any) -> Harness:
    h = Harness(ScriptedFetcher(answer), **kw)
    made.append(h)
    return h


def test_a_joiner_whose_leader_was_refused_sends_its_own_request(made: list[Harness]) -> None:
    held: list[Deferred[Answer]] = []

    def answer(sent: Sent) -> Any:
        if sent.method == b"GET" and sent.authorization is None:
            d: Deferred[Answer] = Deferred()
            held.append(d)  # the anonymous leader's GET waits
            return d
        return by_credential({GOOD})(sent)

    h = harness(made, answer)
    leader = h.fetch(h.request(BLOB_DIGEST))
    joiner = h.fetch(h.request(BLOB_DIGEST, authorization=GOOD))
    assert not joiner.called  # waiting for the leader's upstream answer, not served early
    held[0].callback(refused(401))
    assert result_of(leader).status == 401
    joined = result_of(joiner)
    assert joined.status == 200 and h.read(joined) == BLOB
    gets = [s.authorization for s in h.inner.sent if s.method == b"GET"]
    assert gets == [None, GOOD]
    # Its own request went through the cache: verified, and stored.
    assert joined.cache == "miss" and h.store.contains(BLOB_DIGEST)


def test_a_joiner_retrying_on_its_own_never_completes_wrong_bytes(made: list[Harness]) -> None:
    held: list[Deferred[Answer]] = []
    wrong = b"X" + BLOB[1:]

    def answer(sent: Sent) -> Any:
        if sent.method == b"GET" and sent.authorization is None:
            d: Deferred[Answer] = Deferred()
            held.append(d)
            return d
        if sent.method == b"GET":
            return ok(wrong)  # the joiner's own GET: the right length, a wrong byte
        return by_credential({GOOD})(sent)

    h = harness(made, answer)
    h.fetch(h.request(BLOB_DIGEST))
    joiner = h.fetch(h.request(BLOB_DIGEST, authorization=GOOD))
    held[0].callback(refused(401))
    joined = result_of(joiner)
    with pytest.raises(Exception) as cut:
        h.read(joined)
    assert getattr(cut.value, "kind", None) == "digest_mismatch"
    assert not h.store.contains(BLOB_DIGEST)


def test_a_joiner_whose_leader_failed_gets_a_502_not_a_500(made: list[Harness]) -> None:
    held: list[Deferred[Answer]] = []

    def answer(sent: Sent) -> Any:
        if sent.method == b"GET":
            d: Deferred[Answer] = Deferred()
            held.append(d)
            return d
        return ok(BLOB, head=True)

    h = harness(made, answer, holds_credentials=True)
    leader = h.fetch(h.request(BLOB_DIGEST))
    joiner = h.fetch(h.request(BLOB_DIGEST))
    unreachable = OCIError("UPSTREAM_UNAVAILABLE", "cannot be reached", kind="connect")
    held[0].errback(unreachable)
    with pytest.raises(OCIError) as leader_error:
        result_of(leader)
    assert leader_error.value.status == 502
    # The joiner sent its own request; it fails the same way, as an OCI error.
    assert len(held) == 2
    held[1].errback(unreachable)
    with pytest.raises(OCIError) as joiner_error:
        result_of(joiner)
    assert joiner_error.value.status == 502


def stored(h: Harness, authorization: bytes | None = GOOD) -> None:
    """BLOB fetched once through the cache (so it is stored and R known to hold it)."""
    first = result_of(h.fetch(h.request(BLOB_DIGEST, authorization=authorization)))
    assert h.read(first) == BLOB
    assert h.store.contains(BLOB_DIGEST)


def test_admission_is_remembered_per_credential_not_per_repository(made: list[Harness]) -> None:
    h = harness(made, by_credential({GOOD}))
    stored(h)
    heads = h.inner.count(b"HEAD")
    hit = result_of(h.fetch(h.request(BLOB_DIGEST, authorization=GOOD)))
    assert hit.status == 200 and hit.cache == "hit" and h.inner.count(b"HEAD") == heads
    # Another credential, and no credential, inside the memory's lifetime: each asked anew.
    other = result_of(h.fetch(h.request(BLOB_DIGEST, authorization=OTHER)))
    anonymous = result_of(h.fetch(h.request(BLOB_DIGEST)))
    assert other.status == 401 and anonymous.status == 401
    assert h.inner.count(b"HEAD") == heads + 2


def test_admission_memory_expires(made: list[Harness]) -> None:
    h = harness(made, by_credential({GOOD}))
    stored(h)
    heads = h.inner.count(b"HEAD")
    h.clock.advance(ACCESS_MEMORY - 1)
    result_of(h.fetch(h.request(BLOB_DIGEST, authorization=GOOD)))
    assert h.inner.count(b"HEAD") == heads
    h.clock.advance(2)
    result_of(h.fetch(h.request(BLOB_DIGEST, authorization=GOOD)))
    assert h.inner.count(b"HEAD") == heads + 1


def test_access_checks_are_single_flight_per_credential_and_repository(
    made: list[Harness],
) -> None:
    held: list[tuple[Sent, Deferred[Answer]]] = []
    serving = by_credential({GOOD, OTHER})

    def answer(sent: Sent) -> Any:
        if sent.method == b"HEAD" and held is not None and h.store.contains(BLOB_DIGEST):
            d: Deferred[Answer] = Deferred()
            held.append((sent, d))
            return d
        return serving(sent)

    h = harness(made, answer)
    stored(h)
    h.clock.advance(ACCESS_MEMORY + 1)
    a1 = h.fetch(h.request(BLOB_DIGEST, authorization=GOOD))
    a2 = h.fetch(h.request(BLOB_DIGEST, authorization=GOOD))
    b1 = h.fetch(h.request(BLOB_DIGEST, authorization=OTHER))
    # One HEAD for GOOD's two requests, one of OTHER's own.
    assert sorted(s.authorization for s, _ in held) == [GOOD, OTHER]
    for _, d in held:
        d.callback(ok(BLOB, head=True))
    assert [result_of(d).status for d in (a1, a2, b1)] == [200, 200, 200]


def test_a_public_repository_is_served_anonymously_until_its_memory_expires(
    made: list[Harness],
) -> None:
    h = harness(made, by_credential({None}))
    stored(h, authorization=None)
    h.fetcher.cache.access.public_ttl = 600.0
    heads = h.inner.count(b"HEAD")
    assert result_of(h.fetch(h.request(BLOB_DIGEST))).cache == "hit"
    assert h.inner.count(b"HEAD") == heads  # public: no question asked
    # The upstream makes it private: within the public TTL the cache still serves it...
    h.inner.answer = by_credential(set())
    h.clock.advance(ACCESS_MEMORY + 1)
    assert result_of(h.fetch(h.request(BLOB_DIGEST))).status == 200
    # ...and after it, the upstream is asked and refuses.
    h.clock.advance(600)
    assert result_of(h.fetch(h.request(BLOB_DIGEST))).status == 401


def test_a_refusal_makes_the_cache_forget_a_repository_was_public(made: list[Harness]) -> None:
    h = harness(made, by_credential({None}))
    stored(h, authorization=None)
    h.inner.answer = by_credential(set())
    # A tag request answered 401 to an anonymous client: public no more, at once.
    tag = h.request("latest", kind=Kind.MANIFEST, headers={b"accept": [OCI]})
    assert result_of(h.fetch(tag)).status == 401
    h.clock.advance(ACCESS_MEMORY + 1)
    assert result_of(h.fetch(h.request(BLOB_DIGEST))).status == 401


def test_tag_revalidation_is_never_shared_across_credentials(made: list[Harness]) -> None:
    data = manifest()
    held: list[tuple[Sent, Deferred[Answer]]] = []

    def answer(sent: Sent) -> Any:
        if sent.method == b"HEAD" and sent.reference == "latest":
            d: Deferred[Answer] = Deferred()
            held.append((sent, d))
            return d
        return by_credential({GOOD}, data)(sent)

    h = harness(made, answer)
    accept = {b"accept": [OCI]}
    with_good = h.fetch(
        h.request("latest", kind=Kind.MANIFEST, authorization=GOOD, headers=accept)
    )
    anonymous = h.fetch(h.request("latest", kind=Kind.MANIFEST, headers=accept))
    assert [s.authorization for s, _ in held] == [GOOD, None]  # two HEADs, not one
    held[0][1].callback(ok(data, OCI, head=True))
    held[1][1].callback(refused(401))
    assert result_of(anonymous).status == 401
    served = result_of(with_good)
    assert served.status == 200 and h.read(served) == data


def test_a_manifest_over_one_mib_keeps_its_media_type_and_lists_its_children(
    made: list[Harness],
) -> None:
    # No mediaType in the bytes: only the upstream's Content-Type says what it is.
    data = manifest(size=1_700_000, media_type=None)
    digest = digest_of(data)
    content_type = b"application/vnd.docker.distribution.manifest.v2+json"

    def answer(sent: Sent) -> Answer:
        return ok(data if sent.reference == digest else BLOB, content_type)

    h = harness(made, answer, holds_credentials=True)
    first = result_of(h.fetch(h.request(digest, kind=Kind.MANIFEST)))
    assert h.read(first) == data
    # A new process (the memory gone): the type comes from the store's own record.
    h.fetcher.cache.media_types.clear()
    h.fetcher.cache.hot.discard(digest)
    again = result_of(h.fetch(h.request(digest, kind=Kind.MANIFEST)))
    assert again.cache == "hit" and again.header(b"content-type") == content_type
    assert h.read(again) == data
    assert h.store.index.repository_holds(h.request(digest).route.name, "app", BLOB_DIGEST)


def test_a_blob_stored_for_one_repository_needs_the_upstreams_word_for_another(
    made: list[Harness],
) -> None:
    def answer(sent: Sent) -> Answer:
        return ok(BLOB, head=sent.method == b"HEAD")

    h = harness(made, answer, holds_credentials=True)
    stored(h, authorization=None)
    # A hit for "app" keeps the verified bytes in memory: they are no key to "other".
    assert result_of(h.fetch(h.request(BLOB_DIGEST))).cache == "hit"
    h.inner.answer = lambda sent: refused(404)  # "other" holds no such blob
    other = result_of(h.fetch(h.request(BLOB_DIGEST, name="other")))
    assert other.status == 404
    assert [s.method for s in h.inner.sent[-2:]] == [b"HEAD", b"GET"]
    h.inner.answer = answer
    allowed = result_of(h.fetch(h.request(BLOB_DIGEST, name="other")))
    assert allowed.status == 200 and allowed.cache == "hit"


def test_anonymous_access_lasts_the_public_ttl_not_the_admission_memory(
    made: list[Harness],
) -> None:
    h = harness(made, by_credential({None}))
    h.fetcher.cache.access.public_ttl = 2.0
    stored(h, authorization=None)
    h.inner.answer = by_credential(set())  # made private
    h.clock.advance(3)  # past the public TTL, well inside the admission memory
    assert result_of(h.fetch(h.request(BLOB_DIGEST))).status == 401


def test_confirmations_for_another_repository_are_single_flight(made: list[Harness]) -> None:
    held: list[Deferred[Answer]] = []

    def answer(sent: Sent) -> Any:
        if sent.method == b"HEAD":
            d: Deferred[Answer] = Deferred()
            held.append(d)
            return d
        return ok(BLOB)

    h = harness(made, answer, holds_credentials=True)
    stored(h, authorization=None)
    asked = [h.fetch(h.request(BLOB_DIGEST, name="other")) for _ in range(3)]
    assert len(held) == 1  # one HEAD asks whether "other" holds it, for all three
    held[0].callback(ok(BLOB, head=True))
    assert [result_of(d).status for d in asked] == [200, 200, 200]


def test_a_refused_credential_is_not_remembered_as_admitted(made: list[Harness]) -> None:
    h = harness(made, by_credential({GOOD}))
    stored(h)
    # OTHER asks for something not cached and is refused by the upstream...
    refused_get = result_of(h.fetch(h.request("sha256:" + "1" * 64, authorization=OTHER)))
    assert refused_get.status == 401
    # ...and is still asked (and refused) for what the cache holds.
    assert result_of(h.fetch(h.request(BLOB_DIGEST, authorization=OTHER))).status == 401


def test_a_store_that_cannot_write_still_never_completes_wrong_bytes(
    made: list[Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    from regproxy.cache.faults import StoreUnwritable

    wrong = b"X" + BLOB[1:]
    h = harness(made, lambda sent: ok(wrong, head=sent.method == b"HEAD"))

    def full(digest: str) -> None:
        raise StoreUnwritable("begin", OSError(28, "No space left on device"))

    monkeypatch.setattr(h.store, "begin_write", full)
    answer = result_of(h.fetch(h.request(BLOB_DIGEST, authorization=GOOD)))
    assert answer.status == 200 and answer.cache == "bypass"
    with pytest.raises(Exception) as cut:
        h.read(answer)
    assert getattr(cut.value, "kind", None) == "digest_mismatch"


def test_a_download_for_one_repository_is_joined_by_another_the_upstream_confirms(
    made: list[Harness],
) -> None:
    held: list[Deferred[Answer]] = []

    def answer(sent: Sent) -> Any:
        if sent.method == b"GET":
            d: Deferred[Answer] = Deferred()
            held.append(d)  # the first repository's download waits for its upstream answer
            return d
        return ok(BLOB, head=True)

    h = harness(made, answer, holds_credentials=True)
    leader = h.fetch(h.request(BLOB_DIGEST))
    other = h.fetch(h.request(BLOB_DIGEST, name="other"))
    assert [s.method for s in h.inner.sent] == [b"GET", b"HEAD"]  # asked, not fetched again
    held[0].callback(ok(BLOB))
    joined = result_of(other)
    assert joined.cache == "coalesced"
    readers = [Collector(), Collector()]
    for answered, reader in zip((joined, result_of(leader)), readers, strict=True):
        assert answered.body is not None
        answered.body.deliver(reader)
    h.clock.advance(0)
    assert [reader.data for reader in readers] == [BLOB, BLOB]
    assert [s.method for s in h.inner.sent].count(b"GET") == 1


def test_a_download_is_not_joined_for_a_repository_the_upstream_denies(
    made: list[Harness],
) -> None:
    held: list[Deferred[Answer]] = []

    def answer(sent: Sent) -> Any:
        if sent.name == "other":
            return refused(404)
        if sent.method == b"GET":
            d: Deferred[Answer] = Deferred()
            held.append(d)
            return d
        return ok(BLOB, head=True)

    h = harness(made, answer, holds_credentials=True)
    h.fetch(h.request(BLOB_DIGEST))
    other = result_of(h.fetch(h.request(BLOB_DIGEST, name="other")))
    assert other.status == 404
    assert len(held) == 1
