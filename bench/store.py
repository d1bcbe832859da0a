"""``python -m bench.store``: the cache on a shared object store (a real Ceph RGW on loopback).

Every figure is a ratio from one run on this machine:

1. store-hit blob throughput: a replica whose local tier is empty serves a blob another
   replica put in the store (curl through regproxy) / the same object GET straight from RGW
   (curl on a presigned URL); median of ``--repeats``, a fresh replica each time, with its
   CPU time. ``--baseline DIR`` (a checkout of another revision, e.g. from ``git archive``)
   also runs replicas of that code, interleaved with these, for a before/after in one run;
2. a cold blob behind an upstream slower than the clients (a relay at ``--rate``): upstream
   GETs, every body verified, and the wall time of ``--clients`` clients spread over three
   replicas on one bucket against one client alone on a cold blob of the same size;
3. with ``blob_redirects = "store"``: the proxy's CPU per blob request (a 307) against its
   CPU per manifest hit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.support.proxy import RegproxyProcess
from tests.support.registry import RegistryServer
from tests.support.rgw import RGWServer
from tests.support.waiting import eventually

from .cache import SlowRelay, timed_download, upstream_blob_gets
from .load import Endpoint, curl_download, fetch_verified
from .seed import BlobImage, push_blob_image, random_file
from .suite import MiB

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class Replicas:
    """regproxy processes on one bucket, each with a local tier of its own."""

    def __init__(self, work: Path, rgw: RGWServer, upstream: str, bucket: str) -> None:
        self.work = work
        self.rgw = rgw
        self.upstream = upstream
        self.bucket = bucket
        self.started: list[RegproxyProcess] = []

    def start(self, *extra: str, source: Path | None = None) -> RegproxyProcess:
        """A replica; ``source``: the root of another checkout to run instead of this one."""
        number = len(self.started)
        env = self.rgw.env()
        if source is not None:
            env["PYTHONPATH"] = str(source)
        proxy = RegproxyProcess(
            [
                "--upstream",
                self.upstream,
                "--cache-store",
                f"s3://{self.bucket}/cache",
                "--cache-dir",
                str(self.work / f"tier{number}"),
                *extra,
            ],
            env=env,
            directory=self.work / f"proxy{number}",
            cwd=source,
        )
        self.started.append(proxy)
        return proxy.start()

    def stop(self) -> None:
        for proxy in self.started:
            proxy.stop()

    def leases_left(self) -> list[str]:
        client: Any = self.rgw.client()
        return [o.object_name for o in client.list_objects(self.bucket, "cache/leases/")]


def endpoint(proxy: RegproxyProcess) -> Endpoint:
    return Endpoint("regproxy", proxy.url, pid=proxy.pid)


def store_hits(args: argparse.Namespace, replicas: Replicas, image: BlobImage) -> dict[str, Any]:
    blob = image.blob
    filler = replicas.start()
    fetch_verified(endpoint(filler), image.name, "blobs", blob.digest, blob.digest)
    eventually(lambda: not replicas.leases_left(), 60, what="the upload completed")
    key = f"cache/blobs/sha256/{blob.digest[7:9]}/{blob.digest[7:]}"
    client: Any = replicas.rgw.client()
    sources: dict[str, Path | None] = {"regproxy": None}
    if args.baseline is not None:
        sources["baseline"] = args.baseline
    direct: list[float] = []
    through: dict[str, list[tuple[float, float]]] = {name: [] for name in sources}
    for _ in range(args.repeats):
        url = client.presigned_get_object(replicas.bucket, key)
        direct.append(curl_download(url, blob.size))
        for name, source in sources.items():
            fresh = replicas.start(source=source)
            point = endpoint(fresh)
            before = point.cpu_seconds()
            speed = curl_download(point.url(image.name, "blobs", blob.digest), blob.size)
            through[name].append((speed, point.cpu_seconds() - before))
            fresh.stop()
    rgw_mb_s = statistics.median(direct) / MiB
    result: dict[str, Any] = {"rgw_mb_s": rgw_mb_s, "rgw_runs": [d / MiB for d in direct]}
    for name, runs in through.items():
        mb_s = statistics.median(speed for speed, _ in runs) / MiB
        result[name] = {
            "mb_s": mb_s,
            "ratio": mb_s / rgw_mb_s,
            "cpu_s_per_gib": statistics.median(cpu for _, cpu in runs) * (1 << 30) / blob.size,
            "runs": [speed / MiB for speed, _ in runs],
        }
    result["regproxy_mb_s"] = result["regproxy"]["mb_s"]
    result["ratio"] = result["regproxy"]["ratio"]
    return result


def cold_over_replicas(
    args: argparse.Namespace,
    replicas: Replicas,
    registry: RegistryServer,
    cold: BlobImage,
    alone: BlobImage,
) -> dict[str, Any]:
    relay = SlowRelay(registry.port, args.rate * MiB)
    try:
        slow = Replicas(
            replicas.work / "slow",
            replicas.rgw,
            f"http://127.0.0.1:{relay.port}",
            replicas.rgw.new_bucket("bench"),
        )
        try:
            three = [endpoint(slow.start()) for _ in range(3)]
            one_client, ok = timed_download(three[0], alone.name, alone.blob.digest)
            assert ok, "the lone client's blob did not verify"
            before = upstream_blob_gets(registry, cold.blob.digest)
            started = time.monotonic()
            with ThreadPoolExecutor(max_workers=args.clients) as pool:
                outcomes = list(
                    pool.map(
                        lambda n: timed_download(three[n % 3], cold.name, cold.blob.digest),
                        range(args.clients),
                    )
                )
            together = time.monotonic() - started
        finally:
            slow.stop()
    finally:
        relay.close()
    return {
        "clients": args.clients,
        "replicas": 3,
        "blob_bytes": cold.blob.size,
        "upstream_mb_s": args.rate,
        "upstream_gets": upstream_blob_gets(registry, cold.blob.digest) - before,
        "all_verified": all(ok for _, ok in outcomes),
        "one_client_s": one_client,
        "all_clients_s": together,
        "ratio": together / one_client,
    }


def redirect_cpu(args: argparse.Namespace, replicas: Replicas, image: BlobImage) -> dict[str, Any]:
    proxy = replicas.start("--blob-redirects", "store")
    point = endpoint(proxy)

    def cpu_per(path: str, count: int) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        conn.request("GET", path, headers={"Accept": OCI_MANIFEST})
        conn.getresponse().read()  # warm: the index, the presigning credentials
        before = point.cpu_seconds()
        for _ in range(count):
            conn.request("GET", path, headers={"Accept": OCI_MANIFEST})
            response = conn.getresponse()
            response.read()
        conn.close()
        return (point.cpu_seconds() - before) / count

    count = 50 if args.smoke else 500
    blob = cpu_per(point.path(image.name, "blobs", image.blob.digest), count)
    manifest = cpu_per(point.path(image.name, "manifests", image.manifest_digest), count)
    proxy.stop()
    return {
        "blob_redirect_cpu_ms": blob * 1e3,
        "manifest_hit_cpu_ms": manifest * 1e3,
        "ratio": blob / manifest if manifest else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="regproxy-bench-store-"))
    result: dict[str, Any] = {"settings": vars(args).copy()}
    try:
        with (
            RGWServer(directory=work / "rgw") as rgw,
            RegistryServer(
                directory=work / "registry",
                extra_config={"log": {"level": "info", "accesslog": {"disabled": False}}},
            ) as registry,
        ):
            result["rgw_start_s"] = rgw.started_in
            images = {
                name: push_blob_image(registry.url, name, "v1", random_file(work / name, size))
                for name, size in (
                    ("hot", args.blob_size),
                    *(() if args.only_hits else (("cold", args.cold_size),)),
                    *(() if args.only_hits else (("alone", args.cold_size),)),
                )
            }
            replicas = Replicas(work, rgw, registry.url, rgw.new_bucket("bench"))
            try:
                result["store_hit"] = store_hits(args, replicas, images["hot"])
                if args.only_hits:
                    return result
                result["redirects"] = redirect_cpu(args, replicas, images["hot"])
                result["cold"] = cold_over_replicas(
                    args, replicas, registry, images["cold"], images["alone"]
                )
            finally:
                replicas.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def report(result: dict[str, Any]) -> str:
    hit = result["store_hit"]
    lines = [f"RGW start: {result['rgw_start_s']:.1f} s"]
    lines += [
        f"store-hit blob: {name} {hit[name]['mb_s']:.0f} MB/s"
        f" ({hit[name]['cpu_s_per_gib']:.2f} CPU s/GiB), RGW direct {hit['rgw_mb_s']:.0f}"
        f" MB/s: {hit[name]['ratio']:.2f}x"
        for name in ("regproxy", "baseline")
        if name in hit
    ]
    if "cold" not in result:
        return "\n".join(lines)
    cold, red = result["cold"], result["redirects"]
    return "\n".join(
        [
            *lines,
            f"cold blob ({cold['blob_bytes'] // MiB} MiB, upstream {cold['upstream_mb_s']} MB/s),"
            f" {cold['clients']} clients over {cold['replicas']} replicas:"
            f" {cold['upstream_gets']} upstream GET(s), verified {cold['all_verified']},"
            f" {cold['all_clients_s']:.1f} s vs one client {cold['one_client_s']:.1f} s:"
            f" {cold['ratio']:.2f}x",
            f"blob redirect CPU {red['blob_redirect_cpu_ms']:.2f} ms/request, manifest hit"
            f" {red['manifest_hit_cpu_ms']:.2f} ms/request",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="small sizes, short runs")
    parser.add_argument("--json", type=Path, help="also write the raw result here")
    parser.add_argument("--blob-size", type=int, default=256 * MiB)
    parser.add_argument("--cold-size", type=int, default=256 * MiB)
    parser.add_argument("--rate", type=float, default=50.0, help="upstream MB/s (cold blob)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--baseline",
        type=Path,
        help="root of another checkout: its store hits are measured too, interleaved",
    )
    parser.add_argument("--only-hits", action="store_true", help="measure store hits only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.blob_size = args.cold_size = 4 * MiB
        args.clients = 5
        args.repeats = 1
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
