"""Two worker processes on one --cache-dir, a cold blob through a slow upstream: clients of
the worker that is not downloading read the download in progress from the other worker's
temporary file, at the pace it arrives, verified; the upstream serves the blob once.

The workers share one listening socket, so the kernel does not spread a burst of
connections between them: the clients' connections are evened out over the workers first
(``bench.cache.spread_over_workers``), then all ask at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.cache import SlowRelay, clients_at_once, spread_over_workers
from bench.load import Endpoint
from tests.support.images import build_image, push
from tests.support.registry import RegistryServer

from .test_workers import access_events, start_workers

SIZE = 32 * 1024 * 1024
RATE = 8 * 1024 * 1024  # bytes/s: the download takes about 4 s
CLIENTS = 8


@pytest.fixture
def logged_registry(tmp: Path) -> Iterator[RegistryServer]:
    with RegistryServer(
        directory=tmp / "upstream",
        extra_config={"log": {"level": "info", "accesslog": {"disabled": False}}},
    ) as server:
        yield server


def test_clients_of_both_workers_stream_one_cold_blob_fetched_once(
    start_proxy, logged_registry: RegistryServer, tmp: Path
) -> None:
    image = build_image(tmp / "cold", layers=(SIZE,), tag="cold", compress=False)
    push(tmp / "cold", "cold", f"127.0.0.1:{logged_registry.port}/cold:v1")
    layer = image.layers[0]
    relay = SlowRelay(logged_registry.port, RATE)
    try:
        proxy = start_workers(
            start_proxy,
            ["--upstream", f"http://127.0.0.1:{relay.port}", "--cache-dir", str(tmp / "cache")],
        )
        path = f"/v2/cold/blobs/{layer.digest}"
        conns, _ = spread_over_workers(Endpoint("regproxy", proxy.url), proxy, CLIENTS)
        started, timings = clients_at_once(conns, path, layer.digest)
        for conn in conns:
            conn.close()
        wall = max(t.done for t in timings) - started
        assert [t.error for t in timings] == [None] * CLIENTS
        results = [
            (layer.digest if t.verified else "wrong", (t.first_byte or t.done) - started)
            for t in timings
        ]
        assert [digest for digest, _ in results] == [layer.digest] * CLIENTS
        blob_gets = re.findall(rf'"GET /v2/cold/blobs/{layer.digest} ', logged_registry.log_text())
        assert len(blob_gets) == 1
        served_by = {
            event.get("worker")
            for event in access_events(proxy)
            if layer.digest in str(event.get("path", event.get("uri", "")))
        }
        assert served_by >= {1, 2}, "the clients did not reach both workers"
        # Nobody waited for the download to end: first bytes within a second of the start
        # (the whole blob takes about four), and the whole in about one download's time.
        assert max(first for _, first in results) < 1.5, results
        assert wall < 1.5 * SIZE / RATE + 2, wall
    finally:
        relay.close()
