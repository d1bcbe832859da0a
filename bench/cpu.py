"""CPU per request and per GiB, quickly, for comparing one change with the next.

``python -m bench.cpu [--tls] [--servers regproxy,regproxy-cache,nginx,nginx-cache,site,...]
[--trees A,B] [--workers N] [--seconds 3] [--repeats 3] [--blob-size 256MiB] [--json FILE]
[--profile DIR]``

The full suite (``python -m bench``) takes half an hour and reports ratios; this takes a
minute and reports only the figures a CPU change moves: the server's user + system CPU time
(``/proc/PID/stat`` of it and its children) per manifest GET under wrk at 16 connections,
and per GiB of a blob fetched with curl. CPU time is what other people's load on the
machine disturbs least: their processes slow ours down in wall time, but hardly change how
many CPU seconds ours need. Runs of each server alternate (A B A B ...), so a change in
the machine's load during the run hits every server alike; the median is reported.

Servers: ``regproxy`` (manifest by tag, uncached), ``regproxy-cache`` (``--cache-dir``),
``nginx`` (proxy_pass), ``nginx-cache`` (proxy_cache of digest URLs) and the calibration
servers of ``bench.calibrate`` (``site``, ``agent``, ``treq``, ``wire``, ``treq-wire``). The
caching rows are measured on the manifest by digest after a warm-up, and the registry's
access log must show none of those GETs (else the run stops: they were no hits); their blob
rows are a hit (the big blob, fetched once before) and a miss (a cold blob of the same size,
one per repeat). The RSS of every process of each server is read after its last run.

``--trees`` runs regproxy from other source trees too (``git archive COMMIT | tar -x -C
DIR``), so a change can be compared with its parent in one run. ``--profile DIR`` runs one
extra regproxy under cProfile while wrk loads it and writes ``DIR/regproxy.prof``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.images import MANIFEST_ACCEPT
from tests.support.ports import free_port
from tests.support.proxy import RegproxyProcess
from tests.support.registry import RegistryServer
from tests.support.tls import TLSFiles, make_ca_and_cert

from . import load
from .__main__ import size as parse_size
from .load import Endpoint
from .procs import CalibrationServer, NginxProcess
from .seed import push_blob_image, push_small_image, random_file

PREFIX = "bench"
MISS_KEYS = ("miss_gib", "miss_mbs", "miss_user")
GiB = 1 << 30


@dataclass
class Server:
    """One row: *cached* servers are measured on the manifest by digest (every request a
    hit after the warm-up) and on a blob hit and a cold blob miss."""

    label: str
    endpoint: Endpoint
    cached: bool = False
    blobs: bool = True  # site answers every GET with the manifest


def _seed(registry: RegistryServer, work: Path, blob_size: int, cold: int) -> dict[str, Any]:
    """The small image, the big blob and *cold* more blobs of its size (one per repeat, each
    fetched once through every caching server: a miss each time)."""
    small = push_small_image(registry.url, work / "layout", f"{PREFIX}/small", "latest")
    blob = random_file(work / "blob.bin", blob_size)
    big = push_blob_image(registry.url, f"{PREFIX}/big", "latest", blob)
    blob.path.unlink()
    colds = []
    for index in range(cold):
        one = random_file(work / f"cold{index}.bin", blob_size)
        colds.append(push_blob_image(registry.url, f"{PREFIX}/cold{index}", "latest", one))
        one.path.unlink()
    return {
        "small_digest": small.manifest_digest,
        "small_manifest": small.manifest_bytes,
        "blob": big.blob,
        "cold": colds,
    }


def upstream_requests(registry: RegistryServer, kind: str, reference: str = "") -> Counter[str]:
    """Requests for *kind* (manifests, blobs) the registry's access log shows, by method."""
    pattern = rf'"(GET|HEAD) /v2/\S*/{kind}/{re.escape(reference)}\S* '
    return Counter(re.findall(pattern, registry.log_text()))


@contextlib.contextmanager
def _servers(
    names: list[str],
    trees: list[Path],
    work: Path,
    registry: RegistryServer,
    tls: TLSFiles | None,
    listener_tls: bool = False,
    workers: int = 1,
    site_body: tuple[bytes, str] = (b"{}", "application/json"),
) -> Iterator[list[Server]]:
    """Every server of *names*, started; regproxy rows once per tree in *trees*."""
    with contextlib.ExitStack() as stack:
        servers: list[Server] = []
        for name in names:
            if name in ("regproxy", "regproxy-cache"):
                for index, tree in enumerate(trees):
                    label = name if len(trees) == 1 else f"{name}@{tree.name}"
                    cache = work / f"cache-{index}" if name == "regproxy-cache" else None
                    directory = work / f"{name}{index}"
                    servers.append(
                        _regproxy(
                            stack,
                            label,
                            tree,
                            directory,
                            registry,
                            tls,
                            listener_tls,
                            workers,
                            cache,
                        )
                    )
            elif name in ("nginx", "nginx-cache"):
                nginx = stack.enter_context(
                    NginxProcess(
                        work / name,
                        registry.host_port,
                        PREFIX,
                        registry.scheme,
                        tls.ca_cert if tls else None,
                        workers=workers,
                        listener_tls=(tls.cert, tls.key) if tls and listener_tls else None,
                        cache=name == "nginx-cache",
                    )
                )
                cafile = str(tls.ca_cert) if tls and listener_tls else None
                endpoint = Endpoint(name, nginx.url, cafile=cafile, pid=nginx.pid)
                servers.append(Server(name, endpoint, cached=name == "nginx-cache"))
            else:
                port = free_port()
                args = ["--upstream", registry.url, "--prefix", PREFIX]
                if tls:
                    args += ["--upstream-ca", str(tls.ca_cert)]
                if name == "site":  # answers every GET with the small manifest itself
                    body = work / "site-body"
                    body.write_bytes(site_body[0])
                    args += ["--body", str(body), "--content-type", site_body[1]]
                calib = stack.enter_context(
                    CalibrationServer(work, name, args, f"tcp:{port}:interface=127.0.0.1", port)
                )
                url = f"http://127.0.0.1:{port}"
                endpoint = Endpoint(name, url, pid=calib.pid)
                servers.append(Server(name, endpoint, blobs=name != "site"))
        yield servers


def _regproxy(
    stack: contextlib.ExitStack,
    label: str,
    tree: Path,
    directory: Path,
    registry: RegistryServer,
    tls: TLSFiles | None,
    listener_tls: bool,
    workers: int,
    cache: Path | None,
) -> Server:
    """regproxy from *tree* (with a cache in *cache*, if given), started on *stack*."""
    args = ["--upstream", registry.url, "--repo-prefix", PREFIX, "--workers", str(workers)]
    if tls:
        args += ["--upstream-ca", str(tls.ca_cert)]
    if cache is not None:
        args += ["--cache-dir", str(cache)]
    url = None
    if tls and listener_tls:
        tls_port = free_port()
        args += [
            "--port",
            f"ssl:{tls_port}:privateKey={tls.key}:certKey={tls.cert}:interface=127.0.0.1",
        ]
        url = f"https://127.0.0.1:{tls_port}"
    proxy = stack.enter_context(RegproxyProcess(args=args, directory=directory, cwd=tree))
    cafile = str(tls.ca_cert) if tls and listener_tls else None
    endpoint = Endpoint(label, url or proxy.url, cafile=cafile, pid=proxy.pid)
    return Server(label, endpoint, cached=cache is not None)


def manifest_url(server: Server, small_digest: str) -> str:
    """The small image's manifest: by digest from a caching server, else by tag."""
    return server.endpoint.url("small", "manifests", small_digest if server.cached else "latest")


def manifest_cpu(server: Server, seconds: float, small_digest: str) -> tuple[float, float, float]:
    """(CPU ms per request, requests per second, requests) of one wrk run at 16
    connections."""
    before = server.endpoint.cpu_seconds()
    result = load.run_wrk(manifest_url(server, small_digest), 16, seconds)
    cpu = server.endpoint.cpu_seconds() - before
    if result["errors"] or result["non2xx"]:
        raise RuntimeError(f"{server.label}: errors under load {result}")
    return 1000 * cpu / result["requests"], result["rps"], result["requests"]


def rss_by_process(pid: int) -> list[tuple[str, int]]:
    """(role, VmRSS in KiB) of *pid* and of each of its child processes, *pid* first."""
    rows = []
    for one in load.process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rows.append((_role(one, one == pid), int(line.split()[1])))
    return rows


def _role(pid: int, parent: bool) -> str:
    """What a process of a server's tree is: regproxy's supervisor or worker, nginx's
    master, worker or cache manager (from the title nginx gives them)."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if command[0].startswith(b"nginx: "):
        return command[0].decode()[len("nginx: ") :].partition(" process")[0]
    if b"--as-worker" in command or any(arg.startswith(b"--as-worker=") for arg in command):
        return "worker"
    if parent:
        return "supervisor" if load.process_tree(pid)[1:] else "process"
    return "child"


def user_system_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of *pid* and its children."""
    import os

    user = system = 0
    for one in load.process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{one}/stat").read_text().rpartition(")")[2].split()
            user += int(fields[11])
            system += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def blob_cpu(server: Server, size: int, name: str, digest: str) -> tuple[float, float, float]:
    """(CPU seconds per GiB, MB/s, user share of the CPU) of one curl of the blob."""
    url = server.endpoint.url(name, "blobs", digest)
    assert server.endpoint.pid is not None
    user0, system0 = user_system_seconds(server.endpoint.pid)
    speed = load.curl_download(url, size, server.endpoint.cafile)
    user1, system1 = user_system_seconds(server.endpoint.pid)
    cpu = (user1 - user0) + (system1 - system0)
    return cpu * GiB / size, speed / 1e6, (user1 - user0) / cpu if cpu else 0.0


def _profile(
    work: Path,
    registry: RegistryServer,
    tls: TLSFiles | None,
    out: Path,
    blob: tuple[str, int] | None = None,
    listener_tls: bool = False,
) -> None:
    """One regproxy under cProfile, loaded by wrk for 5 s (or, with *blob* (digest, size),
    fetching that blob twice with curl), then stopped with SIGTERM (exit 0)."""
    args = ["--upstream", registry.url, "--repo-prefix", PREFIX]
    if tls:
        args += ["--upstream-ca", str(tls.ca_cert)]
    url = None
    if tls and listener_tls:
        tls_port = free_port()
        args += [
            "--port",
            f"ssl:{tls_port}:privateKey={tls.key}:certKey={tls.cert}:interface=127.0.0.1",
        ]
        url = f"https://127.0.0.1:{tls_port}"
    out.mkdir(parents=True, exist_ok=True)
    proxy = RegproxyProcess(args=args, directory=work / "profiled")
    argv = proxy.argv
    # SIGTERM stops the reactor (exit 0) and the profile is written on the way out.
    proxy_argv = [sys.executable, "-m", "bench.cpu", "--profiled", str(out / "regproxy.prof")]
    proxy_argv += argv[3:]  # the twist arguments after "python -m twisted"
    process = subprocess.Popen(
        proxy_argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(out / "regproxy.err", "wb"),  # noqa: SIM115
        cwd=proxy.cwd,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        ep = Endpoint("profiled", url or proxy.url, pid=process.pid)
        while True:
            try:
                load.run_wrk(ep.url("small", "manifests", "latest"), 16, 1)
                break
            except RuntimeError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.2)
        if blob is None:
            load.run_wrk(ep.url("small", "manifests", "latest"), 16, 5)
        else:
            cafile = str(tls.ca_cert) if tls and listener_tls else None
            for _ in range(2):
                load.curl_download(ep.url("big", "blobs", blob[0]), blob[1], cafile)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _get_many(url: str, count: int, connections: int = 16) -> None:
    """*count* keep-alive GETs of *url* over *connections* connections, all answered 200."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    errors: list[str] = []

    failures: list[OSError] = []

    def one(share: int) -> None:
        conn = http.client.HTTPConnection(host, parts.port, timeout=600)
        try:
            for _ in range(share):
                conn.request("GET", parts.path, headers={"Accept": MANIFEST_ACCEPT})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    errors.append(str(response.status))
        except OSError as error:
            failures.append(error)
        finally:
            conn.close()

    threads = [
        threading.Thread(target=one, args=(count // connections,)) for _ in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    if errors:
        raise RuntimeError(f"errors: {errors[:5]}")


def instructions(
    work: Path, registry: RegistryServer, tree: Path, count: int, calibration: str | None = None
) -> float:
    """Instructions per manifest GET (valgrind's callgrind, counting only while *count*
    requests at 16 connections are served, after a warm-up): a figure other people's load
    on the machine cannot disturb, unlike CPU time."""
    port = free_port()
    out = work / f"callgrind.{port}"
    if calibration:
        command = ["-m", "bench.calibrate", calibration, "--listen", f"tcp:{port}"]
        command += ["--upstream", registry.url, "--prefix", PREFIX]
    else:
        command = ["-m", "twisted", "regproxy", "--port", f"tcp:{port}:interface=127.0.0.1"]
        command += ["--upstream", registry.url, "--repo-prefix", PREFIX]
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
    argv += [f"--callgrind-out-file={out}", sys.executable, *command]
    log = open(work / f"callgrind.{port}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=tree, start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{port}/v2/small/manifests/latest"
        deadline = time.monotonic() + 300
        while True:
            try:
                _get_many(url, 16)
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.5)
        _get_many(url, 160)  # warm: every connection pooled, every code path run once
        subprocess.run(
            ["callgrind_control", "-i", "on", str(process.pid)], check=True, capture_output=True
        )
        _get_many(url, count)
        subprocess.run(
            ["callgrind_control", "-i", "off", str(process.pid)], check=True, capture_output=True
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    totals = 0
    for dump in work.glob(f"callgrind.{port}*"):
        if dump.suffix == ".log":
            continue
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                totals = max(totals, int(line.split()[1]))
    return totals / count


def profiled(out: str, twist_args: list[str]) -> None:
    """``twist`` under cProfile with a CPU-time clock: the default wall clock would charge
    to whatever function runs when the loaded machine schedules another process."""
    import cProfile

    from twisted.application.twist._twist import Twist  # what "python -m twisted" runs

    profile = cProfile.Profile(time.process_time)
    sys.argv = ["twist", *twist_args]
    try:
        profile.runcall(Twist.main, sys.argv)
    except SystemExit:
        pass
    finally:
        profile.dump_stats(out)


def measure(
    servers: list[Server],
    registry: RegistryServer,
    seeded: dict[str, Any],
    size: int,
    args: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    """Every server warmed, then measured *args.repeats* times in turn; each server's RSS
    after its last run. A caching server's measured requests never reach the upstream (the
    registry's access log shows it), else this raises."""
    small, big = seeded["small_digest"], seeded["blob"].digest
    results: dict[str, dict[str, Any]] = {}
    for server in servers:
        reference = small if server.cached else "latest"
        load.fetch_verified(
            server.endpoint, "small", "manifests", reference, small, MANIFEST_ACCEPT
        )
        _warm(server, registry, small)
        if server.cached and server.blobs and not args.no_blob:
            blob_cpu(server, size, "big", big)  # into the cache
        results[server.label] = {
            "cached": server.cached,
            "manifest_reference": "digest" if "/sha256:" in manifest_url(server, small) else "tag",
            **{key: [] for key in ("ms", "rps", "upstream_get", "upstream_head")},
            **{key: [] for key in ("gib", "mbs", "user", "miss_gib", "miss_mbs", "miss_user")},
        }
    for repeat in range(args.repeats):
        for server in servers:
            row = results[server.label]
            if not args.no_manifest:
                _settle(registry)
                before = upstream_requests(registry, "manifests")
                ms, rps, requests = manifest_cpu(server, args.seconds, small)
                upstream = upstream_requests(registry, "manifests") - before
                if server.cached and upstream["GET"]:
                    raise RuntimeError(
                        f"{server.label}: {upstream['GET']} manifest GETs reached the upstream"
                        f" in {requests:.0f} requests: not cache hits"
                    )
                row["ms"].append(ms)
                row["rps"].append(rps)
                row["upstream_get"].append(upstream["GET"] / max(requests, 1))
                row["upstream_head"].append(upstream["HEAD"] / max(requests, 1))
            if server.blobs and not args.no_blob:
                gets = upstream_requests(registry, "blobs", big)["GET"]
                hit = blob_cpu(server, size, "big", big)
                for key, value in zip(("gib", "mbs", "user"), hit, strict=True):
                    row[key].append(value)
                if server.cached and upstream_requests(registry, "blobs", big)["GET"] > gets:
                    raise RuntimeError(f"{server.label}: the blob hit reached the upstream")
                if server.cached:
                    cold = seeded["cold"][repeat].blob.digest
                    gets = upstream_requests(registry, "blobs", cold)["GET"]
                    values = blob_cpu(server, size, f"cold{repeat}", cold)
                    if upstream_requests(registry, "blobs", cold)["GET"] == gets:
                        raise RuntimeError(f"{server.label}: the cold blob was no miss")
                    for key, value in zip(MISS_KEYS, values, strict=True):
                        row[key].append(value)
    for server in servers:
        assert server.endpoint.pid is not None
        results[server.label]["rss_kib"] = rss_by_process(server.endpoint.pid)
    return results


def _settle(registry: RegistryServer, quiet: float = 0.3, timeout: float = 10.0) -> None:
    """Until the registry's log has not grown for *quiet* s: a server measured before may
    still be answering what wrk left in its queue, and its upstream requests must not count
    for the next one."""
    deadline = time.monotonic() + timeout
    size = -1
    while time.monotonic() < deadline:
        now = registry.log_path.stat().st_size
        if now == size:
            return
        size = now
        time.sleep(quiet)


def _warm(server: Server, registry: RegistryServer, small: str, tries: int = 5) -> None:
    """wrk for a second, every connection pooled and every code path run once; a caching
    server until a run reaches the upstream no more: with --workers, the kernel may have
    given every connection of a run to one worker, and each worker asks the upstream once
    (a HEAD: does R hold the digest) before its first hit."""
    for _ in range(tries):
        _settle(registry)
        before = upstream_requests(registry, "manifests")
        load.run_wrk(manifest_url(server, small), 16, 1)
        if not server.cached or upstream_requests(registry, "manifests") == before:
            return


def _cell(values: list[float], fmt: str) -> str:
    """Median (min-max) of *values*, or '-'."""
    if not values:
        return "-"
    spread = f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else ""
    return (fmt % statistics.median(values)) + spread


def report(results: dict[str, dict[str, Any]]) -> str:
    """The manifest, blob, ratio and RSS tables of *results* (from :func:`measure`)."""
    lines = [
        f"{'manifest GET, 16 conn.':<26} {'ref':<6} {'CPU ms/req':>20} {'req/s':>7}"
        f" {'upstream GET/HEAD per req':>26}"
    ]
    for label, row in results.items():
        if not row["ms"]:
            continue
        upstream = (
            f"{statistics.median(row['upstream_get']):.2f}"
            f" / {statistics.median(row['upstream_head']):.2f}"
        )
        lines.append(
            f"{label:<26} {row['manifest_reference']:<6} {_cell(row['ms'], '%.3f'):>20}"
            f" {_cell(row['rps'], '%.0f').split()[0]:>7} {upstream:>26}"
        )
    lines.append("")
    lines.append(f"{'blob GET (curl)':<26} {'kind':<6} {'CPU s/GiB':>20} {'MB/s':>7} {'user':>5}")
    for label, row in results.items():
        kinds = [("hit", ""), ("miss", "miss_")] if row["cached"] else [("GET", "")]
        for kind, key in kinds:
            if row[key + "gib"]:
                lines.append(
                    f"{label:<26} {kind:<6} {_cell(row[key + 'gib'], '%.2f'):>20}"
                    f" {statistics.median(row[key + 'mbs']):7.0f}"
                    f" {statistics.median(row[key + 'user']):5.0%}"
                )
    ratios = _ratios(results)
    if ratios:
        lines += ["", "CPU per manifest GET, ratios of medians", *ratios]
    lines += ["", "RSS after the runs (VmRSS, MiB)"]
    for label, row in results.items():
        cells = [f"{role} {kib / 1024:.1f}" for role, kib in row["rss_kib"]]
        total = sum(kib for _, kib in row["rss_kib"]) / 1024
        lines.append(f"{label:<26} total {total:6.1f}  " + ", ".join(cells))
    return "\n".join(lines)


def _ratios(results: dict[str, dict[str, Any]]) -> list[str]:
    """Each regproxy row over its calibration: cached over nginx-cache, uncached over nginx."""
    lines = []
    for label, row in results.items():
        base = "nginx-cache" if row["cached"] else "nginx"
        if not label.startswith("regproxy") or not row["ms"]:
            continue
        for other in (base, "site"):
            if other in results and results[other]["ms"]:
                ratio = statistics.median(row["ms"]) / statistics.median(results[other]["ms"])
                lines.append(f"  {label} / {other}: {ratio:.1f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    if (argv or sys.argv[1:])[:1] == ["--profiled"]:
        given = argv or sys.argv[1:]
        profiled(given[1], given[2:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.cpu")
    parser.add_argument("--tls", action="store_true", help="HTTPS upstream")
    parser.add_argument(
        "--tls-listeners", action="store_true", help="with --tls: clients speak HTTPS too"
    )
    parser.add_argument("--servers", default="regproxy,agent,treq,nginx")
    parser.add_argument("--trees", default="", help="regproxy source trees, comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blob-size", default="256MiB")
    parser.add_argument(
        "--workers", type=int, default=1, help="regproxy --workers (and nginx worker_processes)"
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--no-manifest", action="store_true")
    parser.add_argument("--no-blob", action="store_true")
    parser.add_argument("--profile", type=Path, help="write a cProfile of regproxy here")
    parser.add_argument(
        "--profile-blob", action="store_true", help="profile two blob GETs instead of wrk"
    )
    parser.add_argument(
        "--instructions",
        type=int,
        metavar="N",
        help="instead: instructions per manifest GET over N requests, under callgrind",
    )
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    trees = [Path(t).resolve() for t in args.trees.split(",") if t] or [root]
    size = parse_size(args.blob_size)
    work = Path(tempfile.mkdtemp(prefix="regproxy-cpu-"))
    try:
        tls = make_ca_and_cert(work / "tls") if args.tls else None
        with RegistryServer(directory=work / "registry") as plain:
            cold = args.repeats if "cache" in args.servers and not args.no_blob else 0
            seeded = _seed(plain, work, size, cold)
        # The access log shows what reached the upstream: none of a cache hit's requests.
        with RegistryServer(
            tls=tls,
            directory=work / "registry",
            extra_config={"log": {"level": "error", "accesslog": {"disabled": False}}},
        ) as registry:
            if args.instructions:
                names = [n for n in args.servers.split(",") if n and n != "nginx"]
                for name in names:
                    for tree in trees if name == "regproxy" else [root]:
                        per = instructions(
                            work,
                            registry,
                            tree,
                            args.instructions,
                            None if name == "regproxy" else name,
                        )
                        print(
                            f"{name}@{tree.name}: {per / 1000:.0f}k instructions per GET",
                            flush=True,
                        )
                return
            if args.profile:
                blob = (seeded["blob"].digest, size) if args.profile_blob else None
                _profile(work, registry, tls, args.profile, blob, args.tls_listeners)
                print(f"profile written to {args.profile / 'regproxy.prof'}")
            names = [n for n in args.servers.split(",") if n]
            manifest = seeded["small_manifest"]
            site_body = (manifest, json.loads(manifest).get("mediaType", MANIFEST_ACCEPT))
            with _servers(
                names, trees, work, registry, tls, args.tls_listeners, args.workers, site_body
            ) as servers:
                results = measure(servers, registry, seeded, size, args)
        print(report(results))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
