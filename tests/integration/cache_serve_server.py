"""A tiny twisted.web server serving a cache directory with serve_object, run as its own
process by test_cache_serve (real sockets need a real reactor, which unit tests keep out of
their own process). Prints ``port N`` once listening.

GET/HEAD /blob/<digest>  the object (Range honoured)
GET /stats               JSON: counters, open readers
GET /selfcheck           3 bytes: "0", then 1/0 for transport_buffer_is_empty before/after

argv: cache dir, "sendfile" | "producer", and for TLS a certificate and key file.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from regproxy.cache.metrics import RecordingMetrics
from regproxy.cache.serve import (
    choose_range,
    sendfile_transport,
    serve_object,
    transport_buffer_is_empty,
)
from regproxy.cache.store import open_store

metrics = RecordingMetrics()
store = open_store(sys.argv[1], max_size=1 << 34, fsync=False, metrics=metrics)
use_sendfile = sys.argv[2] == "sendfile"


class Blob(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> object:
        digest = request.postpath[0].decode()
        obj = store.open_object(digest)
        if obj is None:
            request.setResponseCode(404)
            return b""
        request.setHeader(b"docker-content-digest", digest.encode())
        d = serve_object(
            request,
            obj,
            byte_range=choose_range(request, obj.size, etag=b'"%s"' % digest.encode()),
            metrics=metrics,
            use_sendfile=use_sendfile,
        )
        d.addErrback(lambda _: None)  # the client went away: nothing to do
        return NOT_DONE_YET

    render_HEAD = render_GET


class Stats(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        readers = sum(entry.readers for entry in store._entries.values())
        return json.dumps({"counters": dict(metrics.counters), "readers": readers}).encode()


class SelfCheck(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        transport = sendfile_transport(request)
        assert transport is not None, "a plain TCP request must be sendfile-able"
        before = transport_buffer_is_empty(transport)
        request.setHeader(b"content-length", b"3")
        request.write(b"0")
        after = transport_buffer_is_empty(transport)
        request.write(b"%d%d" % (before, after))
        request.finish()
        return NOT_DONE_YET  # type: ignore[return-value]


root = Resource()
root.putChild(b"blob", Blob())
root.putChild(b"stats", Stats())
root.putChild(b"selfcheck", SelfCheck())
if len(sys.argv) > 3:  # TLS: certificate and key files
    from twisted.internet import ssl

    with open(sys.argv[3]) as cert, open(sys.argv[4]) as key:
        options = ssl.PrivateCertificate.loadPEM(cert.read() + key.read()).options()
    port = reactor.listenSSL(0, Site(root), options, interface="127.0.0.1")  # type: ignore[attr-defined]
else:
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")  # type: ignore[attr-defined]
print("port", port.getHost().port, flush=True)
reactor.run()  # type: ignore[attr-defined]
