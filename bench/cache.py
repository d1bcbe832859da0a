"""``python -m bench.cache``: the pull-through cache against the registry it caches.

Every figure is a ratio from one run on this machine, so the load the machine carries
affects both sides alike:

1. cache-hit blob GET throughput, regproxy (from its cache) / the distribution registry
   serving the same blob from its own disk (curl, median of ``--repeats``);
2. cache-hit manifest-by-digest request rate, regproxy / the registry (wrk, 16
   connections), and regproxy's CPU per request on hits;
3. RSS growth of regproxy while ``--streams`` clients read a cached blob at once;
4. a cold blob pulled by ``--clients`` clients at once: upstream GETs (from the registry's
   access log) and the time until every client has it, against one client alone;
5. the same behind an upstream slower than the clients (a relay at ~48 MB/s), in three
   layouts: one process, ``--workers 2`` (clients spread evenly over the workers), and two
   processes on one ``--cache-dir`` (clients split between them): upstream GETs and HEADs,
   each client's first byte after the download's first byte, the wall time against one
   client alone, which process (and worker) served whom, and where the CPU went.

``--slow-only`` runs only 5; ``--profile DIR`` records every proxy with py-spy during 5.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.support.proxy import RegproxyProcess
from tests.support.registry import RegistryServer
from tests.support.waiting import eventually

from .load import (
    READ_CHUNK,
    Endpoint,
    FetchError,
    concurrent_streams,
    curl_download,
    fetch_verified,
    process_cpu_seconds,
    process_tree,
    run_wrk,
)
from .seed import BlobImage, connection, push_blob_image, random_file
from .suite import MiB

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def upstream_blob_gets(registry: RegistryServer, digest: str) -> int:
    return len(re.findall(rf'"GET /v2/[^ ]*/blobs/{digest} ', registry.log_text()))


BURST = 0.05
"""Seconds of unused pace a relay connection may catch up on at once."""

_BLOB_GET = re.compile(rb"GET /v2/[^ ]*/blobs/(sha256:[0-9a-f]{64}) ")


@dataclass
class BlobAnswer:
    """When the relay passed the first and the last bytes of one answer to a blob GET."""

    digest: str
    first: float
    last: float | None = None
    # Where the relay's time went meanwhile: waiting for the registry's bytes (recv), for
    # regproxy to take them (send: regproxy reads slower than the pace), and pacing (sleep).
    recv_s: float = 0.0
    send_s: float = 0.0
    sleep_s: float = 0.0


class _Connection:
    """What one relayed connection carries: blob GETs sent up and not yet answered, and the
    blob answer now passing with the body bytes it still has to pass (regproxy does not
    pipeline: the bytes that come back after a request went up are its answer)."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.answering: BlobAnswer | None = None
        self.body_left = 0


class SlowRelay:
    """A TCP relay on loopback that passes the upstream's answers at ``rate`` bytes/s per
    connection: an upstream slower than the clients (Docker Hub, a far region), which is
    what the cache's cold-blob target is about.

    It runs in a process of its own: in this one, 20 client threads would hold the GIL
    between its chunks and slow the upstream down, which the figures would blame on
    regproxy. It notes in ``journal`` (one JSON object a line) when each answer to a blob
    GET passed (times are ``time.monotonic()``, the same clock in every process): its first
    byte is the download's first byte, which clients' first bytes are measured from, and
    its last byte the end of the download."""

    def __init__(self, target_port: int, rate: float, journal: Path | None = None) -> None:
        self.target_port = target_port
        self.rate = rate
        self._own_journal = journal is None
        if journal is None:
            handle, name = tempfile.mkstemp(prefix="regproxy-relay-", suffix=".jsonl")
            os.close(handle)
            journal = Path(name)
        self.journal = journal
        self.journal.write_text("")
        listener = socket.create_server(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        context = multiprocessing.get_context("fork")
        self._process = context.Process(target=self._serve, args=(listener,), daemon=True)
        self._process.start()
        listener.close()  # the relay process's now

    # -- in the relay process -----------------------------------------------------------------

    def _serve(self, listener: socket.socket) -> None:
        self._lock = threading.Lock()
        self._out = self.journal.open("a")
        while True:
            client, _ = listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            carried = _Connection()
            threading.Thread(
                target=self._requests, args=(client, upstream, carried), daemon=True
            ).start()
            threading.Thread(
                target=self._answers, args=(upstream, client, carried), daemon=True
            ).start()

    def _note(self, answer: BlobAnswer) -> None:
        with self._lock:
            self._out.write(json.dumps(asdict(answer)) + "\n")
            self._out.flush()

    def _requests(self, source: socket.socket, sink: socket.socket, carried: _Connection) -> None:
        try:
            while chunk := source.recv(64 * 1024):
                # Noted before the request goes up, so its answer cannot come first.
                with self._lock:
                    carried.asked += [m.decode() for m in _BLOB_GET.findall(chunk)]
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            _shut(source, sink)

    def _answers(self, source: socket.socket, sink: socket.socket, carried: _Connection) -> None:
        # The pace is kept from the chunks before, never from the connection's start: a
        # connection that idled (a pooled one, after a HEAD) gets no burst of saved credit
        # beyond BURST seconds' worth (which absorbs sleep's own lateness).
        free_at = time.monotonic()
        try:
            waited = time.monotonic()
            while chunk := source.recv(64 * 1024):
                now = time.monotonic()
                answer = carried.answering
                with self._lock:
                    asked, carried.asked = carried.asked[:1], carried.asked[1:]
                if asked and answer is None:
                    answer = carried.answering = BlobAnswer(asked[0], now)
                    self._note(answer)
                    head, _, body = chunk.partition(b"\r\n\r\n")
                    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                    carried.body_left = int(length.group(1)) if length else 0
                    carried.body_left -= len(body)
                elif answer is not None:
                    carried.body_left -= len(chunk)
                sink.sendall(chunk)
                sent = time.monotonic()
                free_at = max(free_at, sent - BURST) + len(chunk) / self.rate
                ahead = max(free_at - sent, 0.0)
                if answer is not None:
                    answer.recv_s += now - waited
                    answer.send_s += sent - now
                    answer.sleep_s += ahead
                    if carried.body_left <= 0:
                        answer.last = sent
                        self._note(answer)
                        carried.answering = None
                time.sleep(ahead)
                waited = time.monotonic()
        except OSError:
            pass
        finally:
            _shut(source, sink)

    # -- in the benchmark's process -------------------------------------------------------------

    def answers_since(self, digest: str, since: float) -> list[BlobAnswer]:
        """The answers to GETs of *digest* that began after *since*, the last word on each."""
        latest: dict[float, BlobAnswer] = {}
        for line in self.journal.read_text().splitlines():
            answer = BlobAnswer(**json.loads(line))
            if answer.digest == digest and answer.first >= since:
                latest[answer.first] = answer
        return [latest[first] for first in sorted(latest)]

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    def finished(self, digest: str, since: float) -> BlobAnswer | None:
        """The first answer to a GET of *digest* after *since*, once the relay noted its
        end (clients may finish before the relay wrote it down)."""

        def ended() -> BlobAnswer | None:
            answers = self.answers_since(digest, since)
            return answers[0] if answers and answers[0].last is not None else None

        with contextlib.suppress(AssertionError):
            return eventually(ended, timeout=5, what=f"the relay's end of {digest}")
        return None

    def close(self) -> None:
        self._process.terminate()
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        if self._own_journal:
            self.journal.unlink(missing_ok=True)


def _shut(*sockets: socket.socket) -> None:
    for one in sockets:
        with contextlib.suppress(OSError):
            one.shutdown(socket.SHUT_RDWR)


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


def upstream_blob_heads(registry: RegistryServer, digest: str) -> int:
    return len(re.findall(rf'"HEAD /v2/[^ ]*/blobs/{digest} ', registry.log_text()))


@dataclass(frozen=True)
class ClientTiming:
    """One client's GET of a blob: when its first body byte and its last arrived
    (``time.monotonic()``), whether the body hashed to the digest, and the seconds its
    thread ran and waited for a CPU meanwhile."""

    first_byte: float | None
    done: float
    verified: bool
    error: str | None = None
    sched: tuple[float, float] = (0.0, 0.0)


def schedstat(path: str) -> tuple[float, float]:
    """Seconds on a CPU and waiting on a run queue, from a ``schedstat`` file (0 when it is
    gone or the kernel has no schedstats)."""
    try:
        ran, waited, _ = Path(path).read_text().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(ran) / 1e9, int(waited) / 1e9


def process_schedstat(pid: int) -> tuple[float, float]:
    """``schedstat`` of every thread of *pid* and its children, summed."""
    ran = waited = 0.0
    for one in process_tree(pid):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{one}/task"):
                r, w = schedstat(f"/proc/{one}/task/{task}/schedstat")
                ran, waited = ran + r, waited + w
    return ran, waited


def hashing_client(
    conn: http.client.HTTPConnection, path: str, digest: str, ready: threading.Barrier
) -> ClientTiming:
    """GET a blob on its own connection, already open (with ``--workers`` it was accepted by
    one worker before any request existed), once ``ready`` lets every client ask at once,
    hashing the body as it arrives; nothing is written to disk."""
    first_byte = None
    try:
        ready.wait()
        sched = schedstat("/proc/thread-self/schedstat")
        conn.request("GET", path)
        response = conn.getresponse()
        if response.status != 200:
            return ClientTiming(None, time.monotonic(), False, f"HTTP {response.status}")
        hasher = hashlib.sha256()
        # read1: whatever has arrived, so the first byte is timed when it comes (a full
        # read would wait for the whole buffer).
        first = response.read1(READ_CHUNK)
        first_byte = time.monotonic()
        hasher.update(first)
        buffer = bytearray(READ_CHUNK)
        view = memoryview(buffer)
        while count := response.readinto(buffer):
            hasher.update(view[:count])
        verified = "sha256:" + hasher.hexdigest() == digest
        done = time.monotonic()
        ran, waited = schedstat("/proc/thread-self/schedstat")
        return ClientTiming(
            first_byte,
            done,
            verified,
            None if verified else "digest",
            (ran - sched[0], waited - sched[1]),
        )
    except (OSError, http.client.HTTPException, threading.BrokenBarrierError) as error:
        return ClientTiming(first_byte, time.monotonic(), False, repr(error))
    finally:
        conn.close()


def clients_at_once(
    conns: Sequence[http.client.HTTPConnection], path: str, digest: str
) -> tuple[float, list[ClientTiming]]:
    """One client per open connection, all asking at once; returns when they were let go
    and each one's timing."""
    ready = threading.Barrier(len(conns) + 1, timeout=60)
    with ThreadPoolExecutor(max_workers=len(conns)) as pool:
        futures = [pool.submit(hashing_client, c, path, digest, ready) for c in conns]
        ready.wait()
        started = time.monotonic()
        timings = [f.result() for f in futures]
    return started, timings


def open_at_once(endpoints: Sequence[Endpoint]) -> list[http.client.HTTPConnection]:
    """A connection to each endpoint, all connecting at the same moment."""
    conns = [connection(e.base) for e in endpoints]
    with ThreadPoolExecutor(max_workers=len(conns)) as pool:
        list(pool.map(lambda c: c.connect(), conns))
    return conns


def worker_pids(proxy: RegproxyProcess) -> dict[int, int]:
    """The running workers of a ``--workers`` supervisor: pid -> worker number."""
    serving = re.findall(r"worker (\d+) \(pid (\d+)\) serving", proxy.log_text())
    alive = set(process_tree(proxy.pid))
    return {int(pid): int(number) for number, pid in serving if int(pid) in alive}


def accepted_by(conn: http.client.HTTPConnection, pids: Sequence[int]) -> int | None:
    """Which of ``pids`` holds the server side of ``conn`` (None: still in the backlog):
    the socket's inode from /proc/net/tcp, then the process with a descriptor on it."""
    assert conn.sock is not None
    here, there = conn.sock.getsockname()[1], conn.sock.getpeername()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == there and int(fields[2].split(":")[1], 16) == here:
            inode = fields[9]
    if inode is None or inode == "0":
        return None
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
    return None


def spread_over_workers(
    endpoint: Endpoint, proxy: RegproxyProcess, count: int
) -> tuple[list[http.client.HTTPConnection], dict[str, int]]:
    """``count`` connections opened at once, then evened out over the workers.

    The workers share one inherited listening socket, so the kernel does not spread
    connections: every worker is woken and the first to call accept takes the backlog (a
    burst of 20 went 19 to 1). To measure a download followed from another worker with half
    the clients there, connections are added until each worker holds its share and the
    surplus (never used for a request) is closed. Returns the connections and how the
    first burst landed."""
    workers = worker_pids(proxy)
    conns = open_at_once([endpoint] * count)

    def owner(conn: http.client.HTTPConnection) -> int:
        pid = eventually(lambda: accepted_by(conn, list(workers)), timeout=10, what="accept")
        assert pid is not None
        return pid

    held: dict[int, list[http.client.HTTPConnection]] = {pid: [] for pid in workers}
    for conn in conns:
        held[owner(conn)].append(conn)
    natural = {f"worker {workers[pid]}": len(c) for pid, c in sorted(held.items())}
    share = count // len(workers)
    for _ in range(count * 20):
        if all(len(c) >= share for c in held.values()):
            break
        extra = open_at_once([endpoint])[0]
        held[owner(extra)].append(extra)
    kept: list[http.client.HTTPConnection] = []
    for group in held.values():
        kept += group[:share]
        for surplus in group[share:]:
            surplus.close()
    return kept, natural


def machine_busy() -> tuple[float, float]:
    """Busy and total jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    total = sum(fields[:8])  # without guest time, which user time already counts
    return total - idle, total


def served_by(proxies: dict[str, RegproxyProcess], digest: str, clients: int) -> dict[str, int]:
    """How many 200 answers for *digest* each proxy process (and each worker, when the
    access line names one) gave, with the cache's word for each (``cache=miss``, ...)."""
    served = re.compile(rf"GET /v2/[^ ]*/blobs/{digest} 200 ")

    def count() -> dict[str, int]:
        counts: Counter[str] = Counter()
        for label, proxy in proxies.items():
            for line in proxy.log_text().splitlines():
                if not served.search(line):
                    continue
                cache = re.search(r"cache=(\w+)", line)
                worker = re.search(r"worker=(\d+)", line)
                where = label if worker is None else f"{label} worker {worker.group(1)}"
                counts[f"{where} cache={cache.group(1) if cache else '-'}"] += 1
        return dict(sorted(counts.items()))

    # Workers write their access lines when the response ends, maybe after the client saw it.
    with contextlib.suppress(AssertionError):
        eventually(lambda: sum(count().values()) >= clients, timeout=10, what="access lines")
    return count()


def wait_for_workers(proxy: RegproxyProcess, count: int) -> None:
    def serving() -> bool:
        return len(re.findall(r"worker \d+ \(pid \d+\) serving", proxy.log_text())) >= count

    eventually(serving, timeout=30, what=f"{count} workers serving")


@contextlib.contextmanager
def profiled(proxies: dict[str, RegproxyProcess], directory: Path | None) -> Iterator[None]:
    """py-spy record (raw collapsed stacks, ``python -m bench.profile`` sums them up) of every
    proxy process and its workers while the block runs. The sampler takes CPU of its own:
    figures of a profiled run are for finding where the time goes, not for the table."""
    if directory is None:
        yield
        return
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("--profile: py-spy is not on PATH (pip install py-spy)")
    directory.mkdir(parents=True, exist_ok=True)
    spies = [
        subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(proxy.pid),
                "--rate",
                "200",
                "--nonblocking",
                "--subprocesses",
                "--format",
                "raw",
                "-o",
                str(directory / f"{label.replace(' ', '-')}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for label, proxy in proxies.items()
    ]
    try:
        time.sleep(0.5)  # py-spy attaches
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for spy in spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()


def cold_clients(
    endpoints: Sequence[Endpoint],
    proxies: dict[str, RegproxyProcess],
    relay: SlowRelay,
    registry: RegistryServer,
    cold: BlobImage,
    alone: BlobImage,
    workers: int,
    profile: Path | None = None,
) -> dict[str, Any]:
    """``len(endpoints)`` clients at once on the cold blob ``cold`` through the relay, against
    one client alone on the cold blob ``alone`` of the same size through ``endpoints[0]``:
    upstream GETs, each client's first byte after the download's first byte (the relay's
    answer to the upstream GET), the wall time of all against one, the digests, and where
    the CPU went meanwhile."""
    digest = cold.blob.digest
    path = endpoints[0].path(cold.name, "blobs", digest)
    alone_started, (single,) = clients_at_once(
        open_at_once(endpoints[:1]),
        endpoints[0].path(alone.name, "blobs", alone.blob.digest),
        alone.blob.digest,
    )
    assert single.verified, single.error
    one_client = single.done - alone_started
    alone_answer = relay.finished(alone.blob.digest, alone_started - 1.0)
    if workers > 1:
        (proxy,) = proxies.values()
        conns, natural = spread_over_workers(endpoints[0], proxy, len(endpoints))
    else:
        conns, natural = open_at_once(endpoints), {}
    gets, heads = upstream_blob_gets(registry, digest), upstream_blob_heads(registry, digest)
    others = {"relay": relay.pid, "registry": registry.pid or 0}
    cpu_before = {label: process_schedstat(p.pid) for label, p in proxies.items()}
    cpu_before |= {label: process_schedstat(pid) for label, pid in others.items()}
    own_before, busy_before = os.times(), machine_busy()
    since = time.monotonic()
    with profiled(proxies, profile):
        started, timings = clients_at_once(conns, path, digest)
    own_after, busy_after = os.times(), machine_busy()
    cpu_after = {label: process_schedstat(p.pid) for label, p in proxies.items()}
    cpu_after |= {label: process_schedstat(pid) for label, pid in others.items()}
    together = max(t.done for t in timings) - started
    relay.finished(digest, since)
    answers = relay.answers_since(digest, since)
    download = answers[0] if answers else None
    first_bytes = sorted(
        t.first_byte - download.first for t in timings if t.first_byte is not None and download
    )
    ended = download.last if download else None
    last_bytes = sorted(t.done - ended for t in timings if ended is not None)
    cores = os.cpu_count() or 1
    return {
        "clients": len(timings),
        "blob_bytes": cold.blob.size,
        "upstream_gets": upstream_blob_gets(registry, digest) - gets,
        "upstream_heads": upstream_blob_heads(registry, digest) - heads,
        "relay_blob_answers": len(answers),
        "all_verified": all(t.verified for t in timings),
        "errors": sorted({t.error for t in timings if t.error}),
        # Wall times from the moment the request(s) could be sent to the last byte.
        "one_client_s": one_client,
        "one_client_download_s": alone_answer.last - alone_answer.first
        if alone_answer and alone_answer.last
        else None,
        "all_clients_s": together,
        "ratio": together / one_client,
        # The upstream answer's first to last byte through the relay, in the 20-client run.
        "download_s": ended - download.first if download and ended else None,
        # Each client's first body byte after the upstream's answer began, and its last
        # byte after the upstream's answer ended.
        "first_byte_after_download_s": first_bytes,
        "first_byte_max_s": first_bytes[-1] if first_bytes else None,
        "last_byte_after_download_s": last_bytes,
        "natural_split": natural,
        "served_by": served_by(proxies, digest, len(timings)),
        "delivered_mb_s": len(timings) * cold.blob.size / MiB / together,
        # CPU seconds used during the run: each proxy, the clients' threads, this whole
        # process (clients and the relay), every process on the machine, and what the
        # machine's cores could give in that time.
        "cpu_s": {
            **{label: cpu_after[label][0] - cpu_before[label][0] for label in cpu_after},
            "clients": sum(t.sched[0] for t in timings),
            "bench": sum(own_after[:2]) - sum(own_before[:2]),  # the clients and the rest
            "machine": (busy_after[0] - busy_before[0]) / os.sysconf("SC_CLK_TCK"),
            "available": cores * (time.monotonic() - since),
        },
        # Seconds runnable but waiting for a CPU (the machine's other load).
        "run_queue_wait_s": {
            **{label: cpu_after[label][1] - cpu_before[label][1] for label in cpu_after},
            "clients": sum(t.sched[1] for t in timings),
        },
        # The relay's time during the upstream answer (see BlobAnswer).
        "relay_s": {
            "recv": download.recv_s if download else None,
            "send": download.send_s if download else None,
            "sleep": download.sleep_s if download else None,
        },
    }


def hits_and_cold(
    args: argparse.Namespace,
    work: Path,
    registry: RegistryServer,
    images: dict[str, BlobImage],
    result: dict[str, Any],
) -> None:
    """Rows 1-4: cache hits against the registry's own disk, and a cold blob from it."""
    hot, cold, alone, streamed = (images[k] for k in ("hot", "cold", "alone", "streamed"))
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


def cold_behind_slow_upstream(
    args: argparse.Namespace,
    work: Path,
    registry: RegistryServer,
    images: dict[str, BlobImage],
    result: dict[str, Any],
) -> None:
    """Rows 5-7: a cold blob through an upstream slower than the clients: one process, then
    --workers 2, then two processes on one cache directory (clients split between them);
    each on a cache directory of its own, so both blobs are cold again."""
    cold, alone = images["cold"], images["alone"]
    relay = SlowRelay(registry.port, args.slow_rate, work / "relay.jsonl")
    try:
        upstream = ["--upstream", f"http://127.0.0.1:{relay.port}"]
        layouts: dict[str, list[list[str]]] = {
            "cold_slow_upstream": [[]],
            "cold_slow_workers": [["--workers", "2"]],
            "cold_slow_processes": [[], []],
        }
        for key, layout in layouts.items():
            cache_dir = work / f"cache-{key}"
            proxies: dict[str, RegproxyProcess] = {}
            try:
                workers = 1
                for number, extra in enumerate(layout):
                    proxies[f"process {number}"] = RegproxyProcess(
                        [*upstream, "--cache-dir", str(cache_dir), *extra],
                        directory=work / f"proxy-{key}-{number}",
                    ).start()
                    if "--workers" in extra:
                        # The supervisor listens first; a connection waits in the backlog
                        # until a worker serves, which would count in the first client's time.
                        workers = int(extra[1])
                        wait_for_workers(proxies[f"process {number}"], workers)
                ways = [Endpoint(label, p.url, pid=p.pid) for label, p in proxies.items()]
                endpoints = [ways[n % len(ways)] for n in range(args.clients)]
                result[key] = {
                    "upstream_mb_s": args.slow_rate / MiB,
                    "layout": [" ".join(extra) or "-" for extra in layout],
                    **cold_clients(
                        endpoints,
                        proxies,
                        relay,
                        registry,
                        cold,
                        alone,
                        workers=workers,
                        profile=args.profile / key if args.profile else None,
                    ),
                }
            finally:
                for proxy in proxies.values():
                    proxy.stop()
    finally:
        relay.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="regproxy-bench-cache-"))
    result: dict[str, Any] = {"settings": vars(args).copy()}
    try:
        with RegistryServer(
            directory=work / "registry",
            extra_config={"log": {"level": "info", "accesslog": {"disabled": False}}},
        ) as registry:
            sizes = {"cold": args.cold_size, "alone": args.cold_size}
            if not args.slow_only:
                sizes |= {"hot": args.blob_size, "streamed": args.stream_size}
            images = {
                name: push_blob_image(registry.url, name, "v1", random_file(work / name, size))
                for name, size in sizes.items()
            }
            if not args.slow_only:
                hits_and_cold(args, work, registry, images, result)
            cold_behind_slow_upstream(args, work, registry, images, result)
    finally:
        if args.keep:
            print(f"kept {work} (logs of the registry and every proxy)", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)  # blobs and caches: gigabytes
    return result


def hit_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    blob, manifest, streams, cold = (
        result["blob_hit_mb_s"],
        result["manifest_hit"],
        result["streams"],
        result["cold"],
    )
    return [
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
    ]


SLOW_LAYOUTS = {
    "cold_slow_upstream": "1 process",
    "cold_slow_workers": "--workers 2",
    "cold_slow_processes": "2 processes, 1 directory",
}


def report(result: dict[str, Any]) -> str:
    rows = hit_rows(result) if "blob_hit_mb_s" in result else []
    for key, what in SLOW_LAYOUTS.items():
        slow = result[key]
        first = slow["first_byte_max_s"]
        rows.append(
            (
                f"same, upstream at {slow['upstream_mb_s']:.0f} MB/s, {what}",
                f"{slow['upstream_gets']} upstream GET(s), {slow['upstream_heads']} HEAD(s), "
                f"verified: {slow['all_verified']}, last first byte " + seconds(first, "+"),
                f"{slow['ratio']:.2f}x one client",
                "1 GET, first bytes <= 1 s, <= 1.1x",
            )
        )
        rows.append(("", f"served: {format_served(slow['served_by'])}", "", ""))
        if slow["natural_split"]:
            rows.append(("", f"first burst: {format_served(slow['natural_split'])}", "", ""))
        last = slow["last_byte_after_download_s"]
        cpu = slow["cpu_s"]
        rows.append(
            (
                "",
                f"download {seconds(slow['download_s'])} (alone "
                f"{seconds(slow['one_client_download_s'])}), last client's last byte "
                f"{seconds(last[-1] if last else None, '+')} after it",
                "",
                "",
            )
        )
        rows.append(
            (
                "",
                "CPU s: "
                + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
                + "; run-queue wait s: "
                + ", ".join(f"{k} {v:.1f}" for k, v in slow["run_queue_wait_s"].items())
                + "; relay s: "
                + ", ".join(f"{k} {seconds(v)}" for k, v in slow["relay_s"].items()),
                "",
                "",
            )
        )
    width = max(len(r[0]) for r in rows)
    return "\n".join(
        f"{a:<{width}}  {b:<40} {c:<18} {'target ' + d if d else ''}".rstrip()
        for a, b, c, d in rows
    )


def seconds(value: float | None, sign: str = "") -> str:
    return "-" if value is None else f"{sign}{value:.2f} s"


def format_served(served: dict[str, int]) -> str:
    return ", ".join(f"{where} {count}" for where, count in served.items()) or "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="small sizes, short runs")
    parser.add_argument("--json", type=Path, help="also write the raw result here")
    parser.add_argument(
        "--slow-only",
        action="store_true",
        help="only the cold blob behind the slow upstream (1 process, --workers 2, 2 processes)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs) and print its path"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy record every proxy during the slow-upstream runs, into this directory",
    )
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
