"""``python -m bench.hashing``: a cold blob pulled by many clients at once through nginx in
front of three regproxy replicas, each with a disk cache of its own
(docs/consistent-hashing.rst), behind an upstream slower than the clients (bench.cache's
relay at ``--slow-rate``).

Two layouts of the same nginx example (deploy/nginx/regproxy-consistent-hash.conf), each on
fresh caches and fresh cold blobs:

* ``hash``: as documented, a consistent hash of the blob's digest picks the replica;
* ``round-robin``: the same without its ``hash`` line (nginx's default), for comparison.

Each row: the upstream GETs of the blob for ``--clients`` clients at once, every body
verified, and their wall time against one client alone on another cold blob of the same size
through the same nginx.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.support.nginx import Nginx
from tests.support.proxy import RegproxyProcess
from tests.support.registry import RegistryServer

from .cache import SlowRelay, cold_clients, format_served, seconds
from .load import Endpoint
from .seed import push_blob_image, random_file
from .suite import MiB

REPLICAS = 3
LAYOUTS = {"hash": True, "round-robin": False}


def layout_run(
    args: argparse.Namespace,
    work: Path,
    registry: RegistryServer,
    relay: SlowRelay,
    hashed: bool,
) -> dict[str, Any]:
    blobs = {
        name: push_blob_image(registry.url, name, "v1", random_file(work / name, args.size))
        for name in ("cold", "alone")
    }
    proxies: dict[str, RegproxyProcess] = {}
    nginx: Nginx | None = None
    try:
        for number in range(REPLICAS):
            proxies[f"replica {number}"] = RegproxyProcess(
                [
                    "--upstream",
                    f"http://127.0.0.1:{relay.port}",
                    "--cache-dir",
                    str(work / f"cache{number}"),
                    "--trusted-proxy",
                    "127.0.0.1/32",
                ],
                directory=work / f"replica{number}",
            ).start()
        servers = [proxy.host_port for proxy in proxies.values()]
        nginx = Nginx.in_front_of(servers, work / "nginx", hashed=hashed).start()
        endpoints = [Endpoint("nginx", nginx.url, pid=nginx.pid)] * args.clients
        return cold_clients(
            endpoints, proxies, relay, registry, blobs["cold"], blobs["alone"], workers=1
        )
    finally:
        if nginx is not None:
            nginx.stop()
        for proxy in proxies.values():
            proxy.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="regproxy-bench-hashing-"))
    result: dict[str, Any] = {"settings": vars(args).copy()}
    try:
        with RegistryServer(
            directory=work / "registry",
            extra_config={"log": {"level": "info", "accesslog": {"disabled": False}}},
        ) as registry:
            relay = SlowRelay(registry.port, args.slow_rate, work / "relay.jsonl")
            try:
                for layout, hashed in LAYOUTS.items():
                    (work / layout).mkdir()
                    result[layout] = layout_run(args, work / layout, registry, relay, hashed)
            finally:
                relay.close()
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result


def report(result: dict[str, Any]) -> str:
    settings = result["settings"]
    lines = [
        f"{settings['clients']} clients at once on a cold {settings['size'] // MiB} MiB blob, "
        f"nginx in front of {REPLICAS} replicas (own --cache-dir each), upstream at "
        f"{settings['slow_rate'] / MiB:.0f} MB/s"
    ]
    for layout in LAYOUTS:
        row = result[layout]
        lines.append(
            f"  {layout:<12} {row['upstream_gets']} upstream GET(s), "
            f"{row['upstream_heads']} HEAD(s), verified: {row['all_verified']}, "
            f"wall {seconds(row['all_clients_s'])} vs one client "
            f"{seconds(row['one_client_s'])}: {row['ratio']:.2f}x"
        )
        lines.append(f"  {'':<12} served: {format_served(row['served_by'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hashing", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="4 clients, a 4 MiB blob")
    parser.add_argument("--size", type=int, help="blob size in MiB (default 256)")
    parser.add_argument("--clients", type=int, help="clients at once (default 20)")
    parser.add_argument("--json", type=Path, help="also write the raw result here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    args.size = (args.size or (4 if args.smoke else 256)) * MiB
    args.clients = args.clients or (4 if args.smoke else 20)
    args.slow_rate = (8 if args.smoke else 48) * MiB
    result = run(args)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
