"""Tags in the cache, with a real distribution registry upstream whose access log counts
the manifest HEADs that revalidate a tag: ``--cache-tag-ttl``."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.curl import curl
from tests.support.registry import RegistryServer
from tests.support.seed import SeededRegistry, StandardImages, seed_registry
from tests.support.waiting import eventually

OCI_ACCEPT = "Accept: application/vnd.oci.image.manifest.v1+json"
TAG_TTL = 3.0


@pytest.fixture
def upstream(tmp: Path, standard_images: StandardImages) -> Iterator[SeededRegistry]:
    with RegistryServer(
        directory=tmp / "upstream",
        extra_config={"log": {"level": "info", "accesslog": {"disabled": False}}},
    ) as server:
        yield seed_registry(server, standard_images)


def logged(upstream: SeededRegistry, pattern: str) -> int:
    """Requests in the upstream's access log matching ``pattern``, once every request sent
    so far is in it: a marker request is sent and waited for, as the registry writes its
    log line after it answered."""
    marker = f"/v2/marker-{secrets.token_hex(4)}/tags/list"
    curl(upstream.url + marker)
    eventually(lambda: marker in upstream.registry.log_text(), timeout=10)
    return len(re.findall(pattern, upstream.registry.log_text()))


def tag_heads(upstream: SeededRegistry) -> int:
    return logged(upstream, r'"HEAD /v2/app/manifests/v1 ')


def test_a_tag_is_revalidated_only_once_its_ttl_is_over(
    start_proxy, upstream: SeededRegistry, tmp: Path
) -> None:
    proxy = start_proxy(
        [
            "--upstream",
            upstream.url,
            "--cache-dir",
            str(tmp / "cache"),
            "--cache-tag-ttl",
            str(TAG_TTL),
        ]
    )
    url = proxy.url + "/v2/app/manifests/v1"
    digest = upstream["app:v1"]

    def get() -> None:
        answer = curl(url, "-H", OCI_ACCEPT)
        assert answer.status == 200
        assert answer.header("Docker-Content-Digest") == digest

    confirmed = time.monotonic()
    get()  # revalidated (one HEAD) and stored
    first = tag_heads(upstream)
    assert first >= 1
    # Stored once its digest is a cache hit (the store commits after the answer).
    eventually(
        lambda: (
            curl(proxy.url + f"/v2/app/manifests/{digest}", "-H", OCI_ACCEPT).status == 200
            and any(
                e.get("cache") == "hit" and e.get("path") == f"/v2/app/manifests/{digest}"
                for e in proxy.log_events()
            )
        ),
        timeout=TAG_TTL / 2,
    )
    # Inside the TTL: served from the cache without asking the upstream.
    get()
    get()
    inside = time.monotonic() - confirmed
    assert inside < TAG_TTL, "too slow to check inside the TTL"
    assert tag_heads(upstream) == first

    # Past it: the next request revalidates, once; the ones after it are inside anew.
    def revalidated() -> bool:
        get()
        return tag_heads(upstream) > first

    eventually(revalidated, timeout=TAG_TTL + 10, interval=0.2)
    assert time.monotonic() - confirmed >= TAG_TTL
    get()
    assert tag_heads(upstream) == first + 1
    proxy.stop()
    tag_events = [e for e in proxy.log_events() if e.get("path") == "/v2/app/manifests/v1"]
    assert all(e.get("status") == 200 for e in tag_events)
    assert {e.get("cache") for e in tag_events} >= {"hit"}
