"""Load generators and meters: curl for blob throughput, wrk for manifests, Python clients for
pulls and paced (slow) blob readers, and an RSS sampler reading /proc."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.images import MANIFEST_ACCEPT, OCI_MANIFEST

from .seed import connection

READ_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Endpoint:
    """One way to the same registry content: ``direct`` (the upstream itself, names carry
    the prefix) or a proxy (``nginx``, ``regproxy``; names without the prefix)."""

    label: str
    base: str
    name_prefix: str = ""
    cafile: str | None = None
    pid: int | None = None  # the server behind it (the registry for direct), for CPU time

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid) if self.pid else 0.0

    def path(self, name: str, kind: str, reference: str) -> str:
        return f"/v2/{self.name_prefix}{name}/{kind}/{reference}"

    def url(self, name: str, kind: str, reference: str) -> str:
        return self.base + self.path(name, kind, reference)


def process_tree(pid: int) -> list[int]:
    """*pid* and its child processes (nginx's workers, regproxy's --workers), recursively."""
    pids, queue = [], [pid]
    while queue:
        one = queue.pop()
        pids.append(one)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{one}/task"):
                with contextlib.suppress(OSError):
                    queue += [
                        int(c)
                        for c in Path(f"/proc/{one}/task/{task}/children").read_text().split()
                    ]
    return pids


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of *pid* and all its child processes, from /proc/<pid>/stat."""
    total = 0
    for one in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{one}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


class FetchError(RuntimeError):
    pass


def _get(conn: Any, path: str, headers: dict[str, str] | None = None) -> Any:
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    if response.status != 200:
        body = response.read()
        raise FetchError(f"GET {path}: HTTP {response.status} {body[:200]!r}")
    return response


def read_verified(response: Any, digest: str, expected_size: int | None = None) -> int:
    """Read a body to the end, hashing it; raise unless it matches *digest*."""
    hasher = hashlib.sha256()
    size = 0
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    while True:
        count = response.readinto(buffer)
        if not count:
            break
        hasher.update(view[:count])
        size += count
    if "sha256:" + hasher.hexdigest() != digest:
        raise FetchError(f"body of {size} bytes does not hash to {digest}")
    if expected_size is not None and size != expected_size:
        raise FetchError(f"body of {size} bytes, expected {expected_size}")
    return size


def fetch_verified(
    endpoint: Endpoint,
    name: str,
    kind: str,
    reference: str,
    digest: str,
    accept: str | None = None,
) -> int:
    """GET one manifest or blob and check its digest; returns the body size."""
    conn = connection(endpoint.base, endpoint.cafile)
    try:
        headers = {"Accept": accept} if accept else {}
        response = _get(conn, endpoint.path(name, kind, reference), headers)
        return read_verified(response, digest)
    finally:
        conn.close()


# -- blob throughput ------------------------------------------------------------------------------


def curl_download(url: str, expected_size: int, cafile: str | None = None) -> float:
    """GET *url* with curl into /dev/null; returns bytes per second (curl's average)."""
    argv = [
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download} %{speed_download}",
        "--noproxy",
        "*",
    ]
    if cafile:
        argv += ["--cacert", cafile]
    result = subprocess.run([*argv, url], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise FetchError(f"curl {url}: exit {result.returncode} {result.stderr.strip()}")
    code, size, speed = result.stdout.split()
    if code != "200" or int(size) != expected_size:
        raise FetchError(f"curl {url}: HTTP {code}, {size} of {expected_size} bytes")
    return float(speed)


# -- wrk ------------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, float]:
    result: dict[str, float] = {"errors": 0.0, "non2xx": 0.0}
    for line in output.splitlines():
        line = line.strip()
        percentile = re.fullmatch(r"(50|75|90|99)%\s+(\S+)", line)
        if percentile:
            result[f"p{percentile.group(1)}_ms"] = _ms(percentile.group(2))
        elif line.startswith("Requests/sec:"):
            result["rps"] = float(line.split()[1])
        elif re.match(r"\d+ requests in", line):
            result["requests"] = float(line.split()[0])
        elif line.startswith("Non-2xx or 3xx responses:"):
            result["non2xx"] = float(line.split(":")[1])
        elif line.startswith("Socket errors:"):
            result["errors"] = float(sum(int(n) for n in re.findall(r"\d+", line)))
    for key in ("rps", "p50_ms", "p99_ms", "requests"):
        if key not in result:
            raise ValueError(f"wrk output lacks {key}:\n{output}")
    return result


def run_wrk(
    url: str,
    connections: int,
    duration: float,
    accept: str = OCI_MANIFEST,
    headers: Sequence[str] = (),
) -> dict[str, float]:
    threads = min(2, connections)
    argv = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(duration))}s",
        "--latency",
        "--timeout",
        "10s",
        "-H",
        f"Accept: {accept}",
        *(arg for header in headers for arg in ("-H", header)),
        url,
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed: {result.stderr or result.stdout}")
    return parse_wrk(result.stdout)


# -- concurrent pulls -----------------------------------------------------------------------------


def pull(endpoint: Endpoint, name: str, tag: str, manifest_digest: str) -> int:
    """What ``skopeo copy`` asks for: /v2/, the manifest by tag, the config, every layer.

    One connection per pull (kept alive across its requests); every digest checked.
    Returns the bytes received.
    """
    conn = connection(endpoint.base, endpoint.cafile, timeout=120)
    try:
        conn.request("GET", "/v2/")
        ping = conn.getresponse()
        ping.read()
        if ping.status not in (200, 401):
            raise FetchError(f"GET /v2/: HTTP {ping.status}")
        response = _get(conn, endpoint.path(name, "manifests", tag), {"Accept": MANIFEST_ACCEPT})
        manifest = response.read()
        if "sha256:" + hashlib.sha256(manifest).hexdigest() != manifest_digest:
            raise FetchError("manifest digest mismatch")
        document = json.loads(manifest)
        total = len(manifest)
        for descriptor in [document["config"], *document["layers"]]:
            blob = _get(conn, endpoint.path(name, "blobs", descriptor["digest"]))
            total += read_verified(blob, descriptor["digest"], descriptor["size"])
        return total
    finally:
        conn.close()


def concurrent_pulls(
    endpoint: Endpoint, name: str, tag: str, manifest_digest: str, count: int
) -> dict[str, Any]:
    barrier = threading.Barrier(count)
    errors: list[str] = []
    durations: list[float] = []

    def one(_: int) -> None:
        barrier.wait(timeout=60)
        started = time.monotonic()
        try:
            pull(endpoint, name, tag, manifest_digest)
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}")
        else:
            durations.append(time.monotonic() - started)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=count) as pool:
        list(pool.map(one, range(count)))
    wall = time.monotonic() - started
    return {
        "pulls": count,
        "wall_s": wall,
        "errors": len(errors),
        "error_samples": errors[:3],
        "pull_p50_s": statistics.median(durations) if durations else None,
        "pull_max_s": max(durations) if durations else None,
    }


# -- paced readers and RSS ------------------------------------------------------------------------


def paced_read(
    endpoint: Endpoint,
    name: str,
    digest: str,
    size: int,
    rate: float,
    deadline: float | None = None,
) -> int:
    """GET a blob reading at most *rate* bytes/s (recv, then sleep to stay on schedule).

    Returns the bytes read; stops early (closing the connection) at *deadline* (monotonic).
    """
    conn = connection(endpoint.base, endpoint.cafile, timeout=120)
    try:
        response = _get(conn, endpoint.path(name, "blobs", digest))
        chunk = max(16 * 1024, min(READ_CHUNK, int(rate / 20)))
        buffer = bytearray(chunk)
        started = time.monotonic()
        received = 0
        while received < size:
            count = response.readinto(buffer)
            if not count:
                break
            received += count
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            ahead = received / rate - (now - started)
            if ahead > 0:
                time.sleep(ahead)
        return received
    finally:
        conn.close()


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB, summed over *pid* and its child processes (all workers).

    The summed VmHWM is an upper bound of the tree's peak: each process peaks on its own.
    """
    rss = hwm = 0
    for one in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm += int(line.split()[1])
    return rss, hwm


class RSSSampler:
    """Samples the tree's VmRSS every *interval* s in a thread; resets and reads VmHWM
    around it too."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self.hwm_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.samples.append(rss_kib(self.pid)[0])
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
        for one in process_tree(self.pid):
            with contextlib.suppress(OSError):
                Path(f"/proc/{one}/clear_refs").write_text("5")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError, KeyError):
            self.hwm_kib = rss_kib(self.pid)[1]

    @property
    def peak_kib(self) -> int:
        return max([self.hwm_kib, *self.samples])


def slow_stream(
    endpoint: Endpoint, pid: int, name: str, digest: str, size: int, rate: float
) -> dict[str, Any]:
    """One client reading a blob at *rate* bytes/s, RSS of *pid* sampled every 100 ms."""
    idle = rss_kib(pid)[0]
    started = time.monotonic()
    with RSSSampler(pid) as sampler:
        received = paced_read(endpoint, name, digest, size, rate)
    return {
        "blob_bytes": size,
        "rate_bytes_s": rate,
        "received": received,
        "errors": int(received != size),
        "seconds": time.monotonic() - started,
        "idle_rss_mib": idle / 1024,
        "peak_rss_mib": sampler.peak_kib / 1024,
        "growth_mib": (sampler.peak_kib - idle) / 1024,
        "samples": len(sampler.samples),
    }


def concurrent_streams(
    endpoint: Endpoint,
    pid: int,
    name: str,
    digest: str,
    size: int,
    count: int,
    rate: float,
    max_seconds: float,
) -> dict[str, Any]:
    """*count* clients reading the same blob at *rate* bytes/s each, at most *max_seconds*."""
    idle = rss_kib(pid)[0]
    barrier = threading.Barrier(count)
    results: list[int] = []
    errors: list[str] = []

    def one(_: int) -> None:
        barrier.wait(timeout=60)
        try:
            results.append(paced_read(endpoint, name, digest, size, rate, deadline))
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}")

    started = time.monotonic()
    deadline = started + max_seconds
    with RSSSampler(pid) as sampler, ThreadPoolExecutor(max_workers=count) as pool:
        list(pool.map(one, range(count)))
    seconds = time.monotonic() - started
    return {
        "streams": count,
        "blob_bytes": size,
        "rate_bytes_s": rate,
        "completed": sum(1 for r in results if r == size),
        "received": sum(results),
        "errors": len(errors),
        "error_samples": errors[:3],
        "seconds": seconds,
        "idle_rss_mib": idle / 1024,
        "peak_rss_mib": sampler.peak_kib / 1024,
        "growth_mib": (sampler.peak_kib - idle) / 1024,
    }
