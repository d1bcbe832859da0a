"""A process wiring the cache pieces the way a fetcher would, with a slow upstream of its own,
for test_cache_coalesce: real sockets, a real HTTP client (Agent), real Requests as readers.

argv: cache dir, blob size, "good" | "corrupt", [seconds between chunks, default 0.02].
Prints ``port N``.
/up/<digest>     the upstream: the blob in 256 KiB chunks every 20 ms (corrupt: last byte)
/blob/<digest>   through the cache: a hit from disk, else join or start the one download, else
                 read along another process's download (taking over if it dies)
/stats           JSON: upstream GETs, store objects, readers, counters
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

from twisted.internet import reactor
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from regproxy.cache.download import Download, DownloadProtocol, Downloads
from regproxy.cache.metrics import RecordingMetrics
from regproxy.cache.serve import serve_object
from regproxy.cache.store import open_store
from regproxy.cache.tail import Announcement, RemoteDownload, RemoteDownloads, inotify_notifier

clock: Any = reactor
metrics = RecordingMetrics()
store = open_store(sys.argv[1], max_size=1 << 34, fsync=False, metrics=metrics)
downloads = Downloads(store, clock=clock, orphan_limit=1 << 30)
remote_downloads = RemoteDownloads(store, downloads, clock=clock, notifier=inotify_notifier(clock))
BLOB = bytes(range(256)) * (int(sys.argv[2]) // 256)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
SENT = BLOB[:-1] + b"\0" if sys.argv[3] == "corrupt" and BLOB[-1] != 0 else BLOB
DELAY = float(sys.argv[4]) if len(sys.argv) > 4 else 0.02
upstream_gets = 0
remotes = 0
agent = Agent(clock)
PORT = 0


class Upstream(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> object:
        global upstream_gets
        upstream_gets += 1
        request.setHeader(b"content-length", b"%d" % len(SENT))
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def send(offset: int) -> None:
            if gone:
                return
            request.write(SENT[offset : offset + 256 * 1024])
            if offset + 256 * 1024 >= len(SENT):
                request.finish()
            else:
                clock.callLater(DELAY, send, offset + 256 * 1024)

        send(0)
        return NOT_DONE_YET


def abort(request: Request) -> None:
    transport = getattr(request.channel, "transport", None)
    if transport is not None:
        transport.abortConnection()


class Cached(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> object:
        answer(request, request.postpath[0].decode())
        return NOT_DONE_YET


def answer(request: Request, digest: str) -> None:
    """What a fetcher does: a hit from disk; else join this process's download; else start
    one; else (another process downloads it) read along its file; else start over."""
    obj = store.open_object(digest)
    if obj is not None:
        serve_object(request, obj, metrics=metrics).addErrback(lambda _: None)
        return
    download = downloads.get(digest)
    if download is None:
        download = downloads.start(digest)
        if download is None:
            remote = remote_downloads.find(digest)
            if remote is None:  # committed or given up just now: look again
                clock.callLater(0.01, answer, request, digest)
            else:
                follow(request, digest, remote)
            return
        fetch(download)
    local = download

    def announced(size: int | None) -> None:
        request.setHeader(b"content-length", b"%d" % size)  # type: ignore[str-bytes-safe]
        reader = local.attach(request)
        reader.done.addCallbacks(lambda _: request.finish(), lambda _: abort(request))

    local.when_announced().addCallbacks(announced, lambda _: abort(request))


def fetch(download: Download) -> None:
    """The upstream GET feeding ``download`` (also what a takeover runs)."""
    url = b"http://127.0.0.1:%d/up/%s" % (PORT, download.digest.encode())

    def got(response: Any) -> None:
        download.announce(response.length, [(b"content-type", b"application/octet-stream")])
        response.deliverBody(DownloadProtocol(download))

    agent.request(b"GET", url).addCallbacks(got, download.fail)


def follow(request: Request, digest: str, remote: RemoteDownload) -> None:
    global remotes
    remotes += 1

    def announced(announcement: Announcement) -> None:
        for name, value in announcement.headers:
            request.setHeader(name, value)
        request.setHeader(b"content-length", b"%d" % announcement.size)  # type: ignore[str-bytes-safe]
        reader = remote.attach(request, refetch=fetch)
        reader.done.addCallbacks(lambda _: request.finish(), lambda _: abort(request))

    remote.when_announced().addCallbacks(announced, lambda _: answer(request, digest))


class Stats(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        readers = sum(entry.readers for entry in store._entries.values())
        return json.dumps(
            {
                "upstream_gets": upstream_gets,
                "objects": store.objects,
                "readers": readers,
                "downloads": len(downloads),
                "remotes": remotes,
                "following": len(remote_downloads),
                "inotify": remote_downloads.notifier is not None,
                "counters": dict(metrics.counters),
            }
        ).encode()


root = Resource()
root.putChild(b"up", Upstream())
root.putChild(b"blob", Cached())
root.putChild(b"stats", Stats())
port = clock.listenTCP(0, Site(root), interface="127.0.0.1")
PORT = port.getHost().port
print("port", PORT, flush=True)
clock.run()
