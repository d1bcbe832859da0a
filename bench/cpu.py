"""CPU per request and per GiB, quickly, for comparing one change with the next.

``python -m bench.cpu [--tls] [--servers regproxy,agent,treq,nginx] [--trees A,B]
[--seconds 3] [--repeats 3] [--blob-size 256MiB] [--profile DIR]``

The full suite (``python -m bench``) takes half an hour and reports ratios; this takes a
minute and reports only the figures a CPU change moves: the server's user + system CPU time
(``/proc/PID/stat`` of it and its children) per manifest GET under wrk at 16 connections,
and per GiB of a blob fetched with curl. CPU time is what other people's load on the
machine disturbs least: their processes slow ours down in wall time, but hardly change how
many CPU seconds ours need. Runs of each server alternate (A B A B ...), so a change in
the machine's load during the run hits every server alike; the median is reported.

``--trees`` runs regproxy from other source trees too (``git archive COMMIT | tar -x -C
DIR``), so a change can be compared with its parent in one run. ``--profile DIR`` runs one
extra regproxy under cProfile while wrk loads it and writes ``DIR/regproxy.prof``.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
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
GiB = 1 << 30


@dataclass
class Server:
    label: str
    endpoint: Endpoint


def _seed(registry: RegistryServer, work: Path, blob_size: int) -> dict[str, Any]:
    small = push_small_image(registry.url, work / "layout", f"{PREFIX}/small", "latest")
    blob = random_file(work / "blob.bin", blob_size)
    big = push_blob_image(registry.url, f"{PREFIX}/big", "latest", blob)
    blob.path.unlink()
    return {"small_digest": small.manifest_digest, "blob": big.blob}


@contextlib.contextmanager
def _servers(
    names: list[str],
    trees: list[Path],
    work: Path,
    registry: RegistryServer,
    tls: TLSFiles | None,
    listener_tls: bool = False,
) -> Iterator[list[Server]]:
    ca = str(tls.ca_cert) if tls else None
    client_ca = ca if listener_tls else None
    with contextlib.ExitStack() as stack:
        servers: list[Server] = []
        for name in names:
            if name == "regproxy":
                for index, tree in enumerate(trees):
                    args = ["--upstream", registry.url, "--repo-prefix", PREFIX]
                    if ca:
                        args += ["--upstream-ca", ca]
                    url = None
                    if tls and listener_tls:
                        tls_port = free_port()
                        args += [
                            "--port",
                            f"ssl:{tls_port}:privateKey={tls.key}:certKey={tls.cert}"
                            ":interface=127.0.0.1",
                        ]
                        url = f"https://127.0.0.1:{tls_port}"
                    proxy = stack.enter_context(
                        RegproxyProcess(args=args, directory=work / f"regproxy{index}", cwd=tree)
                    )
                    label = "regproxy" if len(trees) == 1 else f"regproxy@{tree.name}"
                    endpoint = Endpoint(label, url or proxy.url, cafile=client_ca, pid=proxy.pid)
                    servers.append(Server(label, endpoint))
            elif name == "nginx":
                nginx = stack.enter_context(
                    NginxProcess(
                        work / "nginx",
                        registry.host_port,
                        PREFIX,
                        registry.scheme,
                        tls.ca_cert if tls else None,
                        workers=1,
                        listener_tls=(tls.cert, tls.key) if tls and listener_tls else None,
                    )
                )
                endpoint = Endpoint("nginx", nginx.url, cafile=client_ca, pid=nginx.pid)
                servers.append(Server("nginx", endpoint))
            else:
                port = free_port()
                args = ["--upstream", registry.url, "--prefix", PREFIX]
                if ca:
                    args += ["--upstream-ca", ca]
                calib = stack.enter_context(
                    CalibrationServer(work, name, args, f"tcp:{port}:interface=127.0.0.1", port)
                )
                url = f"http://127.0.0.1:{port}"
                servers.append(Server(name, Endpoint(name, url, pid=calib.pid)))
        yield servers


def manifest_cpu(server: Server, seconds: float) -> tuple[float, float]:
    """(CPU ms per request, requests per second) of one wrk run at 16 connections."""
    url = server.endpoint.url("small", "manifests", "latest")
    before = server.endpoint.cpu_seconds()
    result = load.run_wrk(url, 16, seconds)
    cpu = server.endpoint.cpu_seconds() - before
    if result["errors"] or result["non2xx"]:
        raise RuntimeError(f"{server.label}: errors under load {result}")
    return 1000 * cpu / result["requests"], result["rps"]


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


def blob_cpu(server: Server, size: int) -> tuple[float, float, float]:
    """(CPU seconds per GiB, MB/s, user share of the CPU) of one curl of the blob."""
    url = server.endpoint.url("big", "blobs", server.blob_digest)  # type: ignore[attr-defined]
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
    errors: list[str] = []

    failures: list[OSError] = []

    def one(share: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
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
            seeded = _seed(plain, work, size)
        with RegistryServer(tls=tls, directory=work / "registry") as registry:
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
            with _servers(names, trees, work, registry, tls, args.tls_listeners) as servers:
                for server in servers:
                    server.blob_digest = seeded["blob"].digest  # type: ignore[attr-defined]
                    load.fetch_verified(
                        server.endpoint,
                        "small",
                        "manifests",
                        "latest",
                        seeded["small_digest"],
                        MANIFEST_ACCEPT,
                    )
                    load.run_wrk(server.endpoint.url("small", "manifests", "latest"), 16, 1)
                results: dict[str, dict[str, list[float]]] = {
                    s.label: {"ms": [], "rps": [], "gib": [], "mbs": [], "user": []}
                    for s in servers
                }
                for _ in range(args.repeats):
                    for server in servers:
                        if not args.no_manifest:
                            ms, rps = manifest_cpu(server, args.seconds)
                            results[server.label]["ms"].append(ms)
                            results[server.label]["rps"].append(rps)
                        if not args.no_blob:
                            gib, mbs, user = blob_cpu(server, size)
                            results[server.label]["gib"].append(gib)
                            results[server.label]["mbs"].append(mbs)
                            results[server.label]["user"].append(user)
        print(
            f"{'server':<28} {'CPU ms/req':>18} {'req/s':>7} {'CPU s/GiB':>18} {'MB/s':>6}"
            f" {'user':>5}"
        )
        for label, row in results.items():

            def cell(values: list[float], fmt: str) -> str:
                if not values:
                    return "-"
                return (fmt % statistics.median(values)) + (
                    f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else ""
                )

            print(
                f"{label:<28} {cell(row['ms'], '%.3f'):>18} {cell(row['rps'], '%.0f'):>7} "
                f"{cell(row['gib'], '%.2f'):>18} {cell(row['mbs'], '%.0f'):>6}"
                f" {statistics.median(row['user']) if row['user'] else 0:5.0%}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
