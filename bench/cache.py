"""``python -m bench.cache``: the pull-through cache against the registry it caches.

Every figure is a ratio from one run on this machine, so the load the machine carries
affects both sides alike:

1. cache-hit blob GET throughput, regproxy (from its cache) / the distribution registry
   serving the same blob from its own disk (curl, median of ``--repeats``);
2. cache-hit manifest-by-digest request rate, regproxy / the registry (wrk, 16
   connections), and regproxy's CPU per request on hits;
3. RSS growth of regproxy while ``--streams`` clients read a cached blob at once;
4. a cold blob pulled by ``--clients`` clients at once: upstream GETs (from the registry's
   access log) and the time until every client has it, against one client alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.support.proxy import RegproxyProcess
from tests.support.registry import RegistryServer

from .load import (
    Endpoint,
    FetchError,
    concurrent_streams,
    curl_download,
    fetch_verified,
    process_cpu_seconds,
    run_wrk,
)
from .seed import BlobImage, push_blob_image, random_file
from .suite import MiB

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def upstream_blob_gets(registry: RegistryServer, digest: str) -> int:
    return len(re.findall(rf'"GET /v2/[^ ]*/blobs/{digest} ', registry.log_text()))


class SlowRelay:
    """A TCP relay on loopback that passes the upstream's answers at ``rate`` bytes/s per
    connection: an upstream slower than the clients (Docker Hub, a far region), which is
    what the cache's cold-blob target is about."""

    def __init__(self, target_port: int, rate: float) -> None:
        self.target_port = target_port
        self.rate = rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, self.rate), daemon=True
            ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, rate: float | None) -> None:
        started, sent = time.monotonic(), 0
        try:
            while chunk := source.recv(64 * 1024):
                sink.sendall(chunk)
                sent += len(chunk)
                if rate is not None:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            for one in (source, sink):
                with contextlib.suppress(OSError):
                    one.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


def timed_download(endpoint: Endpoint, name: str, digest: str) -> tuple[float, bool]:
    """Seconds to GET a blob and hash it as it arrives (nothing written to disk, which
    would measure the disk), and whether its digest was right."""
    started = time.monotonic()
    try:
        fetch_verified(endpoint, name, "blobs", digest, digest)
        ok = True
    except FetchError:
        ok = False
    return time.monotonic() - started, ok


def cold_run(
    endpoint: Endpoint,
    registry: RegistryServer,
    cold: BlobImage,
    alone: BlobImage,
    clients: int,
) -> dict[str, Any]:
    """``clients`` clients at once on the cold blob ``cold``, against one client on the
    cold blob ``alone`` of the same size; the upstream GETs from the registry's log."""
    one_client, ok = timed_download(endpoint, alone.name, alone.blob.digest)
    assert ok
    before = upstream_blob_gets(registry, cold.blob.digest)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        outcomes = list(
            pool.map(
                lambda _: timed_download(endpoint, cold.name, cold.blob.digest), range(clients)
            )
        )
    together = time.monotonic() - started
    return {
        "clients": clients,
        "blob_bytes": cold.blob.size,
        "upstream_gets": upstream_blob_gets(registry, cold.blob.digest) - before,
        "all_verified": all(ok for _, ok in outcomes),
        "one_client_s": one_client,
        "all_clients_s": together,
        "ratio": together / one_client,
        "delivered_mb_s": clients * cold.blob.size / MiB / together,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="regproxy-bench-cache-"))
    result: dict[str, Any] = {"settings": vars(args).copy()}
    with RegistryServer(
        directory=work / "registry",
        extra_config={"log": {"level": "info", "accesslog": {"disabled": False}}},
    ) as registry:
        hot = push_blob_image(registry.url, "hot", "v1", random_file(work / "hot", args.blob_size))
        cold = push_blob_image(
            registry.url, "cold", "v1", random_file(work / "cold", args.cold_size)
        )
        alone = push_blob_image(
            registry.url, "alone", "v1", random_file(work / "alone", args.cold_size)
        )
        streamed = push_blob_image(
            registry.url, "streamed", "v1", random_file(work / "streamed", args.stream_size)
        )
        proxy = RegproxyProcess(
            ["--upstream", registry.url, "--cache-dir", str(work / "cache")],
            directory=work / "proxy",
        ).start()
        try:
            direct = Endpoint("direct", registry.url, pid=registry.pid)
            cached = Endpoint("regproxy", proxy.url, pid=proxy.pid)
            blob_path = f"/v2/hot/blobs/{hot.blob.digest}"
            curl_download(cached.base + blob_path, hot.blob.size)  # fill the cache
            # 1. blob throughput from the cache against the registry's own disk
            speeds: dict[str, list[float]] = {"direct": [], "regproxy": []}
            for _ in range(args.repeats):
                for endpoint in (direct, cached):
                    url = endpoint.base + blob_path
                    speeds[endpoint.label].append(curl_download(url, hot.blob.size))
            blob = {k: statistics.median(v) / MiB for k, v in speeds.items()}
            result["blob_hit_mb_s"] = blob
            result["blob_hit_ratio"] = blob["regproxy"] / blob["direct"]
            # 2. manifest by digest, hits
            manifest_path = f"/v2/hot/manifests/{hot.manifest_digest}"
            run_wrk(cached.base + manifest_path, 1, 1, OCI_MANIFEST)  # warm
            rates: dict[str, dict[str, Any]] = {}
            for endpoint in (direct, cached):
                cpu = process_cpu_seconds(endpoint.pid) if endpoint.pid else 0.0
                wrk = run_wrk(endpoint.base + manifest_path, 16, args.duration, OCI_MANIFEST)
                used = (process_cpu_seconds(endpoint.pid) if endpoint.pid else 0.0) - cpu
                requests = wrk["requests"]
                rates[endpoint.label] = {
                    "requests_per_s": wrk["rps"],
                    "cpu_ms_per_request": 1000 * used / requests if requests else None,
                    "errors": wrk["errors"] + wrk["non2xx"],
                }
            result["manifest_hit"] = rates
            result["manifest_hit_ratio"] = (
                rates["regproxy"]["requests_per_s"] / rates["direct"]["requests_per_s"]
            )
            # 3. concurrent cache-hit streams: memory stays flat
            curl_download(cached.url("streamed", "blobs", streamed.blob.digest), args.stream_size)
            result["streams"] = concurrent_streams(
                cached,
                proxy.pid,
                "streamed",
                streamed.blob.digest,
                streamed.blob.size,
                args.streams,
                rate=args.stream_rate,
                max_seconds=args.stream_seconds,
            )
            # 4. a cold blob, many clients at once, against one client alone on another cold
            # blob of the same size (both through the proxy, both downloaded and verified)
            result["cold"] = cold_run(cached, registry, cold, alone, args.clients)
        finally:
            proxy.stop()
        # 5. the same through an upstream slower than the clients
        relay = SlowRelay(registry.port, args.slow_rate)
        slow_proxy = RegproxyProcess(
            ["--upstream", f"http://127.0.0.1:{relay.port}", "--cache-dir", str(work / "cache2")],
            directory=work / "proxy2",
        ).start()
        try:
            through = Endpoint("regproxy", slow_proxy.url, pid=slow_proxy.pid)
            result["cold_slow_upstream"] = {
                "upstream_mb_s": args.slow_rate / MiB,
                **cold_run(through, registry, cold, alone, args.clients),
            }
        finally:
            slow_proxy.stop()
            relay.close()
    return result


def report(result: dict[str, Any]) -> str:
    blob, manifest, streams, cold = (
        result["blob_hit_mb_s"],
        result["manifest_hit"],
        result["streams"],
        result["cold"],
    )
    slow = result["cold_slow_upstream"]
    rows = [
        (
            "cache-hit blob GET, MB/s (registry from its disk / regproxy from cache)",
            f"{blob['direct']:.0f} / {blob['regproxy']:.0f}",
            f"{result['blob_hit_ratio']:.2f}x",
            ">= 1.0x",
        ),
        (
            "cache-hit manifest by digest, req/s at 16 connections",
            f"{manifest['direct']['requests_per_s']:.0f} / "
            f"{manifest['regproxy']['requests_per_s']:.0f}",
            f"{result['manifest_hit_ratio']:.2f}x",
            ">= 1.0x",
        ),
        (
            "CPU per manifest hit, ms (regproxy)",
            f"{manifest['regproxy']['cpu_ms_per_request'] or 0:.3f}",
            "",
            "well under 0.2",
        ),
        (
            f"RSS growth, {streams['streams']} concurrent cache-hit streams",
            f"{streams['growth_mib']:.1f} MiB ({streams['completed']} completed, "
            f"{streams['errors']} errors)",
            "",
            "< 64 MiB",
        ),
        (
            f"cold {cold['blob_bytes'] // MiB} MiB blob, {cold['clients']} clients at once",
            f"{cold['upstream_gets']} upstream GET(s), verified: {cold['all_verified']}",
            f"{cold['ratio']:.2f}x one client",
            "1 GET, <= 1.5x",
        ),
        (
            f"same, upstream at {slow['upstream_mb_s']:.0f} MB/s, {slow['clients']} clients",
            f"{slow['upstream_gets']} upstream GET(s), verified: {slow['all_verified']}",
            f"{slow['ratio']:.2f}x one client",
            "1 GET, <= 1.5x",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:<40} {c:<18} target {d}" for a, b, c, d in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="small sizes, short runs")
    parser.add_argument("--json", type=Path, help="also write the raw result here")
    args = parser.parse_args(argv)
    args.blob_size = 8 * MiB if args.smoke else 512 * MiB
    args.cold_size = 4 * MiB if args.smoke else 256 * MiB
    args.repeats = 1 if args.smoke else 5
    args.duration = 1.0 if args.smoke else 5.0
    args.streams = 5 if args.smoke else 100
    args.stream_size = 4 * MiB if args.smoke else 32 * MiB
    args.stream_rate = 4 * MiB
    args.stream_seconds = 5.0 if args.smoke else 20.0
    args.clients = 4 if args.smoke else 20
    args.slow_rate = (8 if args.smoke else 48) * MiB
    result = run(args)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
