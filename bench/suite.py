"""The benchmark run: data, processes, measurements, in a fixed order; everything stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.support.images import MANIFEST_ACCEPT, OCI_MANIFEST
from tests.support.ports import free_port
from tests.support.proxy import RegproxyProcess
from tests.support.registry import RegistryServer
from tests.support.tls import TLSFiles, make_ca_and_cert

from . import load
from .load import Endpoint
from .procs import CalibrationServer, NginxProcess, machine_info
from .seed import BlobImage, connection, push_blob_image, push_small_image, random_file

MiB = 1 << 20
GiB = 1 << 30
PREFIX = "bench"  # upstream names are bench/<name>; clients of the proxies ask for <name>


@dataclass
class Settings:
    blob_size: int = GiB
    repeats: int = 5
    duration: float = 5.0  # seconds per wrk run
    rate_repeats: int = 3  # wrk runs per path and concurrency (median, spread)
    concurrencies: tuple[int, ...] = (1, 16, 64)
    pulls: int = 100
    slow_rate: float = 10e6  # bytes/s of the slow reader
    streams: int = 100
    stream_blob_size: int = 64 * MiB
    stream_rate: float = 4e6  # bytes/s of each of the concurrent readers
    stream_max_seconds: float = 120.0
    tls: bool = True
    tls_listeners: bool = True  # in the TLS run, clients speak HTTPS to both proxies too
    workers: tuple[int, ...] = (2, 1)  # regproxy --workers of each run
    nginx_workers: int | None = None  # None: as many as regproxy's workers in that run
    calibrate: bool = True
    calibration_concurrencies: tuple[int, ...] = (1, 16)
    profile_dir: str | None = None
    profile_seconds: float = 10.0
    smoke: bool = False

    @classmethod
    def smoke_settings(cls, **overrides: Any) -> Settings:
        values: dict[str, Any] = dict(
            blob_size=2 * MiB,
            repeats=2,
            duration=1.0,
            rate_repeats=1,
            pulls=10,
            streams=5,
            stream_blob_size=512 * 1024,
            stream_rate=2e6,
            stream_max_seconds=20.0,
            profile_seconds=2.0,
            smoke=True,
        )
        values.update(overrides)
        return cls(**values)


@dataclass
class Images:
    small_name: str
    small_tag: str
    small_digest: str
    small_blobs: list[tuple[str, int]]
    big: BlobImage
    mid: BlobImage
    extra: dict[str, Any] = field(default_factory=dict)


Log = Callable[[str], None]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# -- phases ---------------------------------------------------------------------------------------


def verify(endpoints: list[Endpoint], images: Images, log: Log) -> dict[str, Any]:
    """Fetch every manifest and blob once through every path, checking digests (warms up)."""
    out: dict[str, Any] = {}
    for ep in endpoints:
        try:
            fetched = load.fetch_verified(
                ep,
                images.small_name,
                "manifests",
                images.small_tag,
                images.small_digest,
                MANIFEST_ACCEPT,
            )
            for digest, _size in images.small_blobs:
                fetched += load.fetch_verified(ep, images.small_name, "blobs", digest, digest)
            for image in (images.big, images.mid):
                fetched += load.fetch_verified(
                    ep, image.name, "manifests", image.tag, image.manifest_digest, OCI_MANIFEST
                )
                fetched += load.fetch_verified(
                    ep, image.name, "blobs", image.blob.digest, image.blob.digest
                )
            out[ep.label] = {"ok": True, "bytes": fetched}
        except Exception as error:
            out[ep.label] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        log(f"  verified {ep.label}: {out[ep.label]}")
    return out


def blob_throughput(
    endpoints: list[Endpoint], images: Images, repeats: int, log: Log
) -> dict[str, Any]:
    big = images.big
    runs: dict[str, list[float]] = {ep.label: [] for ep in endpoints}
    cpu: dict[str, float] = {ep.label: 0.0 for ep in endpoints}
    for number in range(repeats):
        for ep in endpoints:  # interleaved, so drift affects every path alike
            before = ep.cpu_seconds()
            speed = (
                load.curl_download(
                    ep.url(big.name, "blobs", big.blob.digest), big.blob.size, ep.cafile
                )
                / 1e6
            )
            cpu[ep.label] += ep.cpu_seconds() - before
            runs[ep.label].append(speed)
            log(f"  blob {number + 1}/{repeats} {ep.label}: {speed:.0f} MB/s")
    out: dict[str, Any] = {
        label: {
            "runs_mb_s": values,
            "median_mb_s": _median(values),
            # CPU of the server behind the path (registry for direct, else the proxy)
            "cpu_s_per_gib": cpu[label] / (repeats * big.blob.size / GiB),
        }
        for label, values in runs.items()
    }
    out["blob_bytes"] = big.blob.size
    out["ratio_regproxy_nginx"] = _ratio(
        out["regproxy"]["median_mb_s"], out["nginx"]["median_mb_s"]
    )
    return out


def rate(
    ep: Endpoint, url: str, connections: int, duration: float, repeats: int
) -> dict[str, Any]:
    """wrk *repeats* times against *url*: medians, the spread of req/s, and the server's CPU
    per request over all runs (every process of the server: workers included)."""
    runs: list[dict[str, float]] = []
    cpu = 0.0
    for _ in range(repeats):
        before = ep.cpu_seconds()
        runs.append(load.run_wrk(url, connections, duration))
        cpu += ep.cpu_seconds() - before
    requests = sum(r["requests"] for r in runs)
    rps = [r["rps"] for r in runs]
    return {
        "rps": _median(rps),
        "rps_runs": rps,
        "rps_spread": (max(rps) - min(rps)) / _median(rps) if _median(rps) else 0.0,
        "p50_ms": _median([r["p50_ms"] for r in runs]),
        "p99_ms": _median([r["p99_ms"] for r in runs]),
        "requests": requests,
        "errors": sum(r["errors"] for r in runs),
        "non2xx": sum(r["non2xx"] for r in runs),
        "cpu_ms_per_request": 1000 * cpu / requests if requests else 0.0,
    }


def manifest_rates(
    endpoints: list[Endpoint], images: Images, settings: Settings, log: Log
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for connections in settings.concurrencies:
        row: dict[str, Any] = {}
        for ep in endpoints:
            url = ep.url(images.small_name, "manifests", images.small_tag)
            stats = row[ep.label] = rate(
                ep, url, connections, settings.duration, settings.rate_repeats
            )
            log(
                f"  manifest c={connections} {ep.label}: {stats['rps']:.0f} req/s "
                f"p50 {stats['p50_ms']:.2f} ms p99 {stats['p99_ms']:.2f} ms "
                f"CPU {stats['cpu_ms_per_request']:.3f} ms/req "
                f"errors {stats['errors'] + stats['non2xx']:.0f}"
            )
        row["ratio_regproxy_nginx"] = _ratio(row["regproxy"]["rps"], row["nginx"]["rps"])
        row["cpu_ratio_regproxy_nginx"] = _ratio(
            row["regproxy"]["cpu_ms_per_request"], row["nginx"]["cpu_ms_per_request"]
        )
        row["added_p99_ms_regproxy"] = row["regproxy"]["p99_ms"] - row["direct"]["p99_ms"]
        row["added_p50_ms_regproxy"] = row["regproxy"]["p50_ms"] - row["direct"]["p50_ms"]
        row["added_p50_ms_nginx"] = row["nginx"]["p50_ms"] - row["direct"]["p50_ms"]
        row["added_p99_ms_nginx"] = row["nginx"]["p99_ms"] - row["direct"]["p99_ms"]
        out[str(connections)] = row
    return out


def warm_up(endpoints: list[Endpoint], images: Images) -> None:
    """One second of wrk per path, so every worker (and nginx's) has its connections."""
    for ep in endpoints:
        load.run_wrk(ep.url(images.small_name, "manifests", images.small_tag), 16, 1.0)


def pulls(endpoints: list[Endpoint], images: Images, count: int, log: Log) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ep in endpoints:
        out[ep.label] = load.concurrent_pulls(
            ep, images.small_name, images.small_tag, images.small_digest, count
        )
        log(
            f"  {count} pulls {ep.label}: {out[ep.label]['wall_s']:.2f} s, "
            f"{out[ep.label]['errors']} errors {out[ep.label]['error_samples']}"
        )
    return out


def memory(
    settings: Settings, directory: Path, proxy_args: list[str], images: Images, log: Log
) -> dict[str, Any]:
    """RSS growth of a fresh regproxy (warmed up by pulls) under slow and many streams; RSS
    of all its processes together (the supervisor and every worker)."""
    out: dict[str, Any] = {}
    with RegproxyProcess(args=proxy_args, directory=directory) as proxy:
        ep = Endpoint("regproxy", proxy.url)
        wait_serving(proxy)
        warm_up([ep], images)
        load.concurrent_pulls(ep, images.small_name, images.small_tag, images.small_digest, 4)
        time.sleep(0.5)
        out["fresh_rss_mib"] = load.rss_kib(proxy.pid)[0] / 1024
        big, mid = images.big, images.mid
        out["slow_stream"] = load.slow_stream(
            ep, proxy.pid, big.name, big.blob.digest, big.blob.size, settings.slow_rate
        )
        log(f"  slow stream: {out['slow_stream']}")
        time.sleep(0.5)
        out["concurrent_streams"] = load.concurrent_streams(
            ep,
            proxy.pid,
            mid.name,
            mid.blob.digest,
            mid.blob.size,
            settings.streams,
            settings.stream_rate,
            settings.stream_max_seconds,
        )
        log(f"  concurrent streams: {out['concurrent_streams']}")
        out["proxy_alive"] = proxy.running
    return out


def profile(
    settings: Settings,
    proxy: RegproxyProcess,
    endpoints: list[Endpoint],
    images: Images,
    mode: str,
    log: Log,
) -> dict[str, str]:
    """py-spy record (raw collapsed stacks) of regproxy under manifest load and blob GETs.

    Runs after the measured phases: the sampler's own CPU use must not bias the table.
    """
    directory = Path(settings.profile_dir or ".")
    directory.mkdir(parents=True, exist_ok=True)
    py_spy = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
    if not os.access(py_spy, os.X_OK):
        log("  py-spy is not installed (pip install py-spy): no profiles")
        return {}
    regproxy = next(ep for ep in endpoints if ep.label == "regproxy")
    seconds = settings.profile_seconds
    outputs: dict[str, str] = {}

    def record(name: str, work: Callable[[], object]) -> None:
        path = directory / f"{mode}-{name}.txt"
        spy = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(proxy.pid),
                "--rate",
                "200",
                "--nonblocking",
                "--subprocesses",  # --workers: the workers are the supervisor's children
                "--format",
                "raw",
                "--duration",
                str(int(seconds)),
                "-o",
                str(path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(1.0)
            deadline = time.monotonic() + seconds - 1.0
            while time.monotonic() < deadline:
                work()
            spy.wait(timeout=seconds + 30)
        finally:
            if spy.poll() is None:
                spy.terminate()
                spy.wait(timeout=10)
        outputs[name] = str(path)
        log(f"  profile {name}: {path}")

    url = regproxy.url(images.small_name, "manifests", images.small_tag)
    record("manifest", lambda: load.run_wrk(url, 16, max(1.0, seconds - 1.5)) and None)
    big = images.big
    record(
        "blob",
        lambda: (
            load.curl_download(regproxy.url(big.name, "blobs", big.blob.digest), big.blob.size)
            and None
        ),
    )
    record(
        "pulls",
        lambda: (
            load.concurrent_pulls(
                regproxy,
                images.small_name,
                images.small_tag,
                images.small_digest,
                settings.pulls,
            )
            and None
        ),
    )
    return outputs


# -- one run: upstream plain or TLS, some number of workers ------------------------------------


def wait_serving(proxy: RegproxyProcess, timeout: float = 30.0) -> None:
    """Until every worker runs: the supervisor's port accepts before any worker does."""
    deadline = time.monotonic() + timeout
    expected = 0
    if "--workers" in proxy.args:
        expected = int(proxy.args[proxy.args.index("--workers") + 1])
    while expected > 1:
        serving = sum(" serving" in message for message in proxy.log_messages())
        if serving >= expected:
            break
        if time.monotonic() > deadline or not proxy.running:
            raise RuntimeError(f"regproxy workers did not start:\n{proxy.log_text()[-3000:]}")
        time.sleep(0.1)


def run_mode(
    settings: Settings,
    directory: Path,
    registry: RegistryServer,
    tls: TLSFiles | None,
    images: Images,
    workers: int,
    full: bool,
    log: Log,
) -> dict[str, Any]:
    ca = str(tls.ca_cert) if tls else None
    proxy_args = ["--upstream", registry.url, "--repo-prefix", PREFIX, "--workers", str(workers)]
    if ca:
        proxy_args += ["--upstream-ca", ca]
    listener_tls = tls is not None and settings.tls_listeners
    mode = f"{'tls' if tls else 'plain'} upstream, --workers {workers}" + (
        ", TLS listeners" if listener_tls else ""
    )
    nginx_workers = settings.nginx_workers or workers
    out: dict[str, Any] = {
        "upstream": registry.url,
        "upstream_tls": tls is not None,
        "listener_tls": listener_tls,
        "workers": workers,
        "nginx_workers": nginx_workers,
    }
    nginx = NginxProcess(
        directory / "nginx",
        registry.host_port,
        PREFIX,
        registry.scheme,
        tls.ca_cert if tls else None,
        workers=nginx_workers,
        listener_tls=(tls.cert, tls.key) if tls and listener_tls else None,
    )
    tls_port = free_port()
    args = list(proxy_args)
    if tls and listener_tls:
        args += [
            "--port",
            f"ssl:{tls_port}:privateKey={tls.key}:certKey={tls.cert}:interface=127.0.0.1",
        ]
    with nginx, RegproxyProcess(args=args, directory=directory / "regproxy") as proxy:
        wait_serving(proxy)
        regproxy_url = f"https://127.0.0.1:{tls_port}" if listener_tls else proxy.url
        endpoints = [
            Endpoint("direct", registry.url, PREFIX + "/", ca, registry.pid),
            Endpoint("nginx", nginx.url, cafile=ca if listener_tls else None, pid=nginx.pid),
            Endpoint("regproxy", regproxy_url, cafile=ca if listener_tls else None, pid=proxy.pid),
        ]
        out["verified"] = verify(endpoints, images, log)
        failed = {k: v for k, v in out["verified"].items() if not v["ok"]}
        if failed:
            raise RuntimeError(
                f"content check failed: {failed}\n{proxy.log_text()[-3000:]}\n"
                f"{nginx.log_text()[-3000:]}"
            )
        warm_up(endpoints, images)
        log(f"[{mode}] blob throughput")
        out["blob"] = blob_throughput(endpoints, images, settings.repeats, log)
        log(f"[{mode}] manifest rate")
        out["manifest"] = manifest_rates(endpoints, images, settings, log)
        if full:
            log(f"[{mode}] concurrent pulls")
            out["pulls"] = pulls(endpoints, images, settings.pulls, log)
        if settings.profile_dir:
            log(f"[{mode}] profiling regproxy")
            name = f"{'tls' if tls else 'plain'}-w{workers}"
            out["profiles"] = profile(settings, proxy, endpoints, images, name, log)
        out["regproxy_alive"] = proxy.running
    if full:
        log(f"[{mode}] regproxy memory")
        out["memory"] = memory(settings, directory / "regproxy-memory", proxy_args, images, log)
    return out


# -- calibration: the floor under regproxy's CPU per request ----------------------------------

CALIBRATIONS = (
    ("site", "twisted.web Site"),
    ("agent", "Agent relay"),
    ("treq", "treq relay"),
    ("wire", "regproxy agent relay"),
    ("treq-wire", "treq over regproxy agent"),
)


def calibrate(
    settings: Settings,
    directory: Path,
    registry: RegistryServer,
    tls: TLSFiles | None,
    images: Images,
    log: Log,
) -> dict[str, Any]:
    """Manifest GETs through the bare single-process servers of bench/calibrate.py."""
    listener_tls = tls is not None and settings.tls_listeners
    ca = str(tls.ca_cert) if tls else None
    manifest = directory / "manifest.json"
    directory.mkdir(parents=True, exist_ok=True)
    conn = connection(registry.url, ca)
    try:
        conn.request(
            "GET",
            f"/v2/{PREFIX}/{images.small_name}/manifests/{images.small_tag}",
            headers={"Accept": MANIFEST_ACCEPT},
        )
        response = conn.getresponse()
        manifest.write_bytes(response.read())
        content_type = response.getheader("Content-Type") or OCI_MANIFEST
    finally:
        conn.close()
    out: dict[str, Any] = {"manifest_bytes": manifest.stat().st_size, "rows": {}}
    for kind, label in CALIBRATIONS:
        port = free_port()
        listen = f"tcp:{port}:interface=127.0.0.1"
        if tls and listener_tls:
            listen = f"ssl:{port}:privateKey={tls.key}:certKey={tls.cert}:interface=127.0.0.1"
        args = ["--upstream", registry.url, "--prefix", PREFIX]
        if ca:
            args += ["--upstream-ca", ca]
        if kind == "site":
            args = ["--body", str(manifest), "--content-type", content_type]
        scheme = "https" if listener_tls else "http"
        with CalibrationServer(directory, kind, args, listen, port) as server:
            ep = Endpoint(
                label,
                f"{scheme}://127.0.0.1:{port}",
                cafile=ca if listener_tls else None,
                pid=server.pid,
            )
            load.fetch_verified(
                ep,
                images.small_name,
                "manifests",
                images.small_tag,
                images.small_digest,
                MANIFEST_ACCEPT,
            )
            warm_up([ep], images)
            row: dict[str, Any] = {}
            for connections in settings.calibration_concurrencies:
                url = ep.url(images.small_name, "manifests", images.small_tag)
                stats = row[str(connections)] = rate(
                    ep, url, connections, settings.duration, settings.rate_repeats
                )
                log(
                    f"  calibration c={connections} {label}: {stats['rps']:.0f} req/s "
                    f"CPU {stats['cpu_ms_per_request']:.3f} ms/req"
                )
            out["rows"][label] = row
    return out


# -- the whole suite ------------------------------------------------------------------------------


def seed(registry: RegistryServer, work: Path, settings: Settings, log: Log) -> Images:
    started = time.monotonic()
    big_file = random_file(work / "big.bin", settings.blob_size)
    mid_file = random_file(work / "mid.bin", settings.stream_blob_size)
    log(f"  random data written in {time.monotonic() - started:.1f} s")
    small = push_small_image(registry.url, work / "layout", f"{PREFIX}/small", "latest")
    big = push_blob_image(registry.url, f"{PREFIX}/big", "latest", big_file)
    mid = push_blob_image(registry.url, f"{PREFIX}/mid", "latest", mid_file)
    big_file.path.unlink()
    mid_file.path.unlink()
    shutil.rmtree(work / "layout", ignore_errors=True)
    log(f"  images pushed in {time.monotonic() - started:.1f} s")
    # the clients of the proxies ask for the names without the prefix
    strip = len(PREFIX) + 1
    return Images(
        small_name="small",
        small_tag="latest",
        small_digest=small.manifest_digest,
        small_blobs=[(b.digest, b.size) for b in (small.config, *small.layers)],
        big=BlobImage(big.name[strip:], big.tag, big.blob, big.manifest_digest),
        mid=BlobImage(mid.name[strip:], mid.tag, mid.blob, mid.manifest_digest),
    )


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its waited
    children). Their difference over the run is CPU that other processes took from us."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(v) for v in fields]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # minus idle, iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), (
        own.user + own.system + own.children_user + own.children_system
    )


def _load_report(start: tuple[float, float], wall: float) -> dict[str, float]:
    end = _cpu_seconds()
    busy, own = end[0] - start[0], end[1] - start[1]
    return {
        "wall_s": wall,
        "machine_busy_cpu_s": busy,
        "suite_cpu_s": own,
        "foreign_cpu_s": max(0.0, busy - own),
        "foreign_cpu_share": max(0.0, busy - own) / (wall * (os.cpu_count() or 1)),
    }


def run(settings: Settings, log: Log = print) -> dict[str, Any]:
    cpu_start, wall_start = _cpu_seconds(), time.monotonic()
    result: dict[str, Any] = {
        "settings": asdict(settings),
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": {},
        "calibration": {},
    }
    work = Path(tempfile.mkdtemp(prefix="regproxy-bench-"))
    try:
        registry_dir = work / "registry"
        log(f"seeding a registry with a {settings.blob_size} byte blob")
        with RegistryServer(directory=registry_dir) as registry:
            images = seed(registry, work, settings, log)
            for workers in settings.workers:
                result["runs"][f"plain-w{workers}"] = run_mode(
                    settings,
                    work / f"plain-w{workers}",
                    registry,
                    None,
                    images,
                    workers,
                    full=True,
                    log=log,
                )
            if settings.calibrate:
                log("[plain upstream] calibration")
                result["calibration"]["plain"] = calibrate(
                    settings, work / "calibrate-plain", registry, None, images, log
                )
        if settings.tls:
            tls = make_ca_and_cert(work / "tls")
            # the same storage, served over HTTPS by a second registry process
            with RegistryServer(tls=tls, directory=registry_dir) as registry:
                for workers in settings.workers:
                    result["runs"][f"tls-w{workers}"] = run_mode(
                        settings,
                        work / f"tls-w{workers}",
                        registry,
                        tls,
                        images,
                        workers,
                        full=False,
                        log=log,
                    )
                if settings.calibrate:
                    log("[tls upstream] calibration")
                    result["calibration"]["tls"] = calibrate(
                        settings, work / "calibrate-tls", registry, tls, images, log
                    )
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work, ignore_errors=True)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["machine_load"] = _load_report(cpu_start, time.monotonic() - wall_start)
    if result["machine_load"]["foreign_cpu_share"] > 0.05:
        log(
            f"WARNING: other processes used {result['machine_load']['foreign_cpu_s']:.0f} "
            "CPU seconds during the run; the numbers are disturbed"
        )
    result["targets"] = targets(result)
    return result


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for every run, each with the measured value and whether it is met."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, op: str) -> None:
        met = (
            value is not None
            and {
                ">=": value >= limit,
                "<": value < limit,
                "<=": value <= limit,
            }[op]
        )
        rows.append({"target": name, "value": value, "limit": limit, "op": op, "met": met})

    for key, run_ in result["runs"].items():
        tls = run_.get("upstream_tls", key.startswith("tls"))
        what = f"{'TLS' if tls else 'plain'} upstream, --workers {run_.get('workers', 1)}"
        blob = run_["blob"]
        add(
            f"blob GET regproxy/nginx ({what})",
            blob["ratio_regproxy_nginx"],
            0.8 if tls else 1.0,
            ">=",
        )
        add(
            f"blob CPU per GiB regproxy/nginx ({what})",
            _ratio(blob["regproxy"].get("cpu_s_per_gib"), blob["nginx"].get("cpu_s_per_gib")),
            1.5 if tls else 1.1,
            "<=",
        )
        manifest = run_["manifest"]
        if "16" in manifest:
            add(
                f"manifest rate regproxy/nginx at 16 connections ({what})",
                manifest["16"]["ratio_regproxy_nginx"],
                0.8,
                ">=",
            )
            add(
                f"CPU per manifest GET, ms, at 16 connections ({what})",
                manifest["16"]["regproxy"]["cpu_ms_per_request"],
                0.3,
                "<=",
            )
        if "1" in manifest:
            add(
                f"p99 added over direct at 1 connection, ms ({what})",
                manifest["1"]["added_p99_ms_regproxy"],
                2.0,
                "<",
            )
        if "memory" in run_:
            memory = run_["memory"]
            add(
                f"RSS growth, slow 10 MB/s stream, MiB ({what})",
                memory["slow_stream"]["growth_mib"],
                10.0,
                "<",
            )
            add(
                f"RSS growth, concurrent streams, all processes, MiB ({what})",
                memory["concurrent_streams"]["growth_mib"],
                64.0,
                "<",
            )
        if "pulls" in run_:
            add(
                f"errors in concurrent pulls through regproxy ({what})",
                float(run_["pulls"]["regproxy"]["errors"]),
                1.0,
                "<",
            )
    return rows
