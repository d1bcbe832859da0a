"""The cache pieces composed as a fetcher composes them, on real sockets: many clients of one
cold blob cost one upstream GET, a slow client slows nobody, wrong bytes reach no client whole
and are not kept. The server (with its own slow upstream) runs in a process of its own."""

from __future__ import annotations

import hashlib
import socket
import subprocess
from pathlib import Path

from tests.support.waiting import eventually

from .cache_processes import Server

SCRIPT = Path(__file__).with_name("cache_coalesce_server.py")
SIZE = 8 * 1024 * 1024
BLOB = bytes(range(256)) * (SIZE // 256)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def start_curls(url: str, count: int, outdir: Path) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [
                "curl",
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "60",
                "-o",
                str(outdir / f"c{i}"),
                "-w",
                "%{http_code} %{size_download}",
                url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(count)
    ]


class SlowReader:
    """A raw socket client reading at most 32 KiB every 20 ms (under 1.6 MB/s: at least five
    seconds for the blob, while the others take about one)."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        self.data = b""
        self.sock.setblocking(False)
        self.closed = False

    def step(self) -> None:
        if self.closed:
            return
        try:
            chunk = self.sock.recv(32 * 1024)
        except BlockingIOError:
            return
        except ConnectionError:
            chunk = b""
        if chunk:
            self.data += chunk
        else:
            self.closed = True
            self.sock.close()

    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]


def test_twenty_clients_one_upstream_get_and_a_slow_one_slows_nobody(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    server = Server(SCRIPT, str(tmp_path / "cache"), str(SIZE), "good")
    curls: list[subprocess.Popen[bytes]] = []
    try:
        url = f"{server.base}/blob/{DIGEST}"
        slow = SlowReader(server.port, f"/blob/{DIGEST}")
        curls = start_curls(url, 19, tmp_path / "out")

        def fast_ones_done() -> bool:
            slow.step()  # the slow client reads a little at every look
            return all(c.poll() is not None for c in curls)

        eventually(fast_ones_done, 120, 0.02, what="every fast client done")
        # Every fast client is done while the slow one is still reading.
        assert not slow.closed and len(slow.data) < SIZE
        for i, c in enumerate(curls):
            assert c.returncode == 0, c.stderr.read() if c.stderr else ""
            assert (tmp_path / "out" / f"c{i}").read_bytes() == BLOB
        eventually(lambda: slow.step() or slow.closed, 120, 0.02, what="the slow client done")
        assert slow.body() == BLOB
        stats = server.stats()
        assert stats["upstream_gets"] == 1
        assert stats["objects"] == 1 and stats["readers"] == 0 and stats["downloads"] == 0
        assert stats["counters"]["coalesced_readers"] >= 1
        # A second round is served from disk.
        again = start_curls(url, 3, tmp_path / "out")
        for c in again:
            assert c.wait(60) == 0
        assert server.stats()["upstream_gets"] == 1
        assert (tmp_path / "out" / "c0").read_bytes() == BLOB
    finally:
        for c in curls:
            if c.poll() is None:
                c.kill()
            c.wait()
        server.stop()


def test_corrupt_upstream_bytes_reach_no_client_whole_and_are_not_kept(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    server = Server(SCRIPT, str(tmp_path / "cache"), str(SIZE), "corrupt")
    curls: list[subprocess.Popen[bytes]] = []
    try:
        curls = start_curls(f"{server.base}/blob/{DIGEST}", 5, tmp_path / "out")
        for i, c in enumerate(curls):
            c.wait(60)
            # curl 18 "transfer closed with outstanding read data remaining", or 56 "failure
            # in receiving network data" (the reset of the aborted connection): never 0.
            assert c.returncode in (18, 56)
            assert len((tmp_path / "out" / f"c{i}").read_bytes()) < SIZE
        stats = server.stats()
        assert stats["objects"] == 0 and stats["downloads"] == 0
        assert stats["counters"]["digest_mismatches"] == 1
        assert stats["upstream_gets"] == 1
        assert not [p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()]
    finally:
        for c in curls:
            if c.poll() is None:
                c.kill()
            c.wait()
        server.stop()


def test_a_download_whose_only_client_left_completes_into_the_cache(tmp_path: Path) -> None:
    server = Server(SCRIPT, str(tmp_path / "cache"), str(SIZE), "good")
    try:
        quitter = SlowReader(server.port, f"/blob/{DIGEST}")
        eventually(lambda: server.stats()["downloads"] == 1, 60, 0.01, what="the download started")
        quitter.sock.close()
        eventually(
            lambda: server.stats()["objects"] == 1, 60, what="the orphaned download completed"
        )
        assert server.stats()["upstream_gets"] == 1
    finally:
        server.stop()


def test_two_processes_on_one_directory_fetch_a_blob_once(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    cache = str(tmp_path / "cache")
    first = Server(SCRIPT, cache, str(SIZE), "good")
    second = Server(SCRIPT, cache, str(SIZE), "good")
    curls: list[subprocess.Popen[bytes]] = []
    try:
        curls = start_curls(f"{first.base}/blob/{DIGEST}", 1, tmp_path / "out")
        eventually(
            lambda: first.stats()["downloads"] == 1, 60, 0.01, what="the first download started"
        )
        (tmp_path / "out2").mkdir()
        curls += start_curls(f"{second.base}/blob/{DIGEST}", 4, tmp_path / "out2")
        for c in curls:
            assert c.wait(60) == 0
        for path in [tmp_path / "out" / "c0"] + [tmp_path / "out2" / f"c{i}" for i in range(4)]:
            assert path.read_bytes() == BLOB
        one, two = first.stats(), second.stats()
        assert one["upstream_gets"] + two["upstream_gets"] == 1
        assert two["remotes"] >= 1 and two["counters"]["remote_readers"] >= 1
    finally:
        for c in curls:
            if c.poll() is None:
                c.kill()
            c.wait()
        first.stop()
        second.stop()


def test_a_process_killed_mid_download_leaves_nothing_served(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    cache = str(tmp_path / "cache")
    server = Server(SCRIPT, cache, str(SIZE), "good")
    try:
        reader = SlowReader(server.port, f"/blob/{DIGEST}")
        eventually(lambda: server.stats()["downloads"] == 1, 60, 0.01, what="the download started")
        server.helper.kill()  # kill -9 mid-download
        reader.sock.close()
        assert [p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()]
        restarted = Server(SCRIPT, cache, str(SIZE), "good")
        try:
            assert not [p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()]
            curls = start_curls(f"{restarted.base}/blob/{DIGEST}", 1, tmp_path / "out")
            assert curls[0].wait(60) == 0
            assert (tmp_path / "out" / "c0").read_bytes() == BLOB
            assert restarted.stats()["upstream_gets"] == 1
        finally:
            restarted.stop()
    finally:
        server.stop()


def body_bytes(reader: SlowReader) -> int:
    return len(reader.body()) if b"\r\n\r\n" in reader.data else 0


def test_another_process_streams_the_download_while_it_is_in_progress(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    first = Server(SCRIPT, cache, str(SIZE), "good", "0.1")  # about 3 s for the blob
    second = Server(SCRIPT, cache, str(SIZE), "good")
    try:
        writer = SlowReader(first.port, f"/blob/{DIGEST}")

        def started() -> bool:
            writer.step()
            return bool(first.stats()["downloads"] == 1)

        eventually(started, 60, 0.01, what="the download started")
        along = SlowReader(second.port, f"/blob/{DIGEST}")

        def both_read() -> None:
            along.step()
            writer.step()

        # Bytes reach the other process's client while the download is still running.
        eventually(
            lambda: both_read() or body_bytes(along) >= 1024 * 1024,
            60,
            0.01,
            what="bytes from the download in progress",
        )
        assert first.stats()["objects"] == 0 and first.stats()["downloads"] == 1
        assert second.stats()["inotify"]  # told of new bytes, not polling
        eventually(lambda: both_read() or (along.closed and writer.closed), 60, 0.01)
        assert along.body() == BLOB and writer.body() == BLOB
        assert first.stats()["upstream_gets"] + second.stats()["upstream_gets"] == 1
    finally:
        first.stop()
        second.stop()


def test_when_the_writing_process_dies_one_other_process_takes_over(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    cache = str(tmp_path / "cache")
    first = Server(SCRIPT, cache, str(SIZE), "good", "0.2")  # about 6 s for the blob
    others = [Server(SCRIPT, cache, str(SIZE), "good") for _ in range(2)]
    curls: list[subprocess.Popen[bytes]] = []
    try:
        writer = SlowReader(first.port, f"/blob/{DIGEST}")
        eventually(lambda: first.stats()["downloads"] == 1, 60, 0.01, what="download started")
        for n, server in enumerate(others):
            (tmp_path / "out" / str(n)).mkdir()
            curls += start_curls(f"{server.base}/blob/{DIGEST}", 3, tmp_path / "out" / str(n))
        eventually(
            lambda: all(
                server.stats()["counters"].get("remote_readers", 0) == 3 for server in others
            ),
            60,
            0.01,
            what="the others read along",
        )
        first.helper.kill()  # kill -9 mid-download
        writer.sock.close()
        for c in curls:
            assert c.wait(60) == 0
        for n in range(2):
            for i in range(3):
                assert (tmp_path / "out" / str(n) / f"c{i}").read_bytes() == BLOB
        stats = [server.stats() for server in others]
        assert sum(s["upstream_gets"] for s in stats) == 1
        assert sum(s["counters"].get("takeovers", 0) for s in stats) == 1, stats
        assert sum(s["objects"] for s in stats) >= 1
    finally:
        for c in curls:
            if c.poll() is None:
                c.kill()
            c.wait()
        first.stop()
        for server in others:
            server.stop()
