"""Request framing the proxy refuses, as tables: the rule itself (``framing_error``) and
the same requests through the real HTTP parser (Twisted's channel with ProxySite), where
some rules are Twisted's own.

A refusal is a 400 with an OCI body and a closed connection, and nothing sent after the
refused request is ever read as another request: a request pipelined behind it gets no
answer. Each refused shape is one a front proxy could frame differently (smuggling).
"""

from __future__ import annotations

import json
import re

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from regproxy.web.framing import framing_error
from regproxy.web.observe import ClientAddress, Metrics
from regproxy.web.site import ProxySite

CHUNKED_BODY = b"3\r\nabc\r\n0\r\n\r\n"
NEXT = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
STATUS_LINE = re.compile(rb"HTTP/1\.[01] \d{3} [A-Za-z ]+\r\n")


def headers(*lines: tuple[bytes, bytes]) -> Headers:
    result = Headers()
    for name, value in lines:
        result.addRawHeader(name, value)
    return result


HOST = (b"host", b"registry.example:5000")


@pytest.mark.parametrize(
    ("method", "lines", "version", "refused"),
    [
        # Host: exactly one, well formed; required in HTTP/1.1 only.
        (b"GET", [HOST], b"HTTP/1.1", None),
        (b"GET", [], b"HTTP/1.1", "needs a Host"),
        (b"GET", [], b"HTTP/1.0", None),
        (b"GET", [HOST, HOST], b"HTTP/1.1", "exactly one"),
        (b"GET", [(b"host", b"a b")], b"HTTP/1.1", "exactly one"),
        (b"GET", [(b"host", b"user@evil.example")], b"HTTP/1.1", "exactly one"),
        (b"GET", [(b"host", b"")], b"HTTP/1.0", "exactly one"),
        (b"GET", [(b"host", b"[::1]:5000")], b"HTTP/1.1", None),
        # Transfer-Encoding: exactly one chunked, on one line, any case.
        (b"POST", [HOST, (b"transfer-encoding", b"chunked")], b"HTTP/1.1", None),
        (b"POST", [HOST, (b"transfer-encoding", b" Chunked ")], b"HTTP/1.1", None),
        (b"POST", [HOST, (b"transfer-encoding", b"identity")], b"HTTP/1.1", "only Transfer"),
        (b"POST", [HOST, (b"transfer-encoding", b"gzip")], b"HTTP/1.1", "only Transfer"),
        (
            b"POST",
            [HOST, (b"transfer-encoding", b"identity"), (b"transfer-encoding", b"chunked")],
            b"HTTP/1.1",
            "only Transfer",
        ),
        (
            b"POST",
            [HOST, (b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"identity")],
            b"HTTP/1.1",
            "only Transfer",
        ),
        (
            b"POST",
            [HOST, (b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")],
            b"HTTP/1.1",
            "only Transfer",
        ),
        (b"POST", [HOST, (b"transfer-encoding", b"gzip, chunked")], b"HTTP/1.1", "only Transfer"),
        (b"POST", [HOST, (b"transfer-encoding", b"")], b"HTTP/1.1", "only Transfer"),
        (b"POST", [HOST, (b"content-length", b"3")], b"HTTP/1.1", None),
        # Reads carry no body: no Transfer-Encoding at all, no Content-Length but 0.
        (b"GET", [HOST, (b"content-length", b"0")], b"HTTP/1.1", None),
        (b"HEAD", [HOST, (b"content-length", b" 0 ")], b"HTTP/1.1", None),
        (b"GET", [HOST, (b"content-length", b"1")], b"HTTP/1.1", "carry no body"),
        (b"GET", [HOST, (b"content-length", b"00")], b"HTTP/1.1", "carry no body"),
        (b"HEAD", [HOST, (b"content-length", b"5")], b"HTTP/1.1", "carry no body"),
        (
            b"GET",
            [HOST, (b"content-length", b"0"), (b"content-length", b"1")],
            b"HTTP/1.1",
            "carry no body",
        ),
        (b"GET", [HOST, (b"transfer-encoding", b"chunked")], b"HTTP/1.1", "carry no body"),
        (b"HEAD", [HOST, (b"transfer-encoding", b"chunked")], b"HTTP/1.1", "carry no body"),
        (b"GET", [HOST, (b"transfer-encoding", b"identity")], b"HTTP/1.1", "only Transfer"),
    ],
)
def test_framing_rules(
    method: bytes, lines: list[tuple[bytes, bytes]], version: bytes, refused: str | None
) -> None:
    error = framing_error(method, headers(*lines), version)
    if refused is None:
        assert error is None
    else:
        assert error is not None
        assert (error.code, error.status) == ("REQUEST_INVALID", 400)
        assert refused in error.message


class Echo(Resource):
    isLeaf = True

    def render(self, request):  # type: ignore[no-untyped-def]
        assert request.content is not None
        return b"got: " + request.content.read()


def serve(raw: bytes) -> tuple[bytes, bool]:
    """What the proxy's HTTP stack answers to ``raw`` on one connection, and whether it
    closed the connection."""
    site = ProxySite(Echo(), metrics=Metrics(), client_address=ClientAddress(()))
    address = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = site.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    output, closed = transport.value(), transport.disconnecting
    channel.connectionLost(None)  # type: ignore[arg-type]
    return output, closed


def request(method: bytes, *lines: bytes, body: bytes = b"") -> bytes:
    head = b"".join(line + b"\r\n" for line in lines)
    return method + b" /x HTTP/1.1\r\nHost: a\r\n" + head + b"\r\n" + body


REFUSED = [
    # Several Transfer-Encoding lines ending in chunked: Twisted alone would read the
    # first as no coding and decode the body as chunked.
    request(
        b"POST",
        b"Transfer-Encoding: identity",
        b"Transfer-Encoding: chunked",
        body=CHUNKED_BODY,
    ),
    request(
        b"GET", b"Transfer-Encoding: identity", b"Transfer-Encoding: chunked", body=CHUNKED_BODY
    ),
    request(
        b"POST",
        b"Transfer-Encoding: chunked",
        b"Transfer-Encoding: identity",
        body=CHUNKED_BODY,
    ),
    request(b"POST", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
    # A coding list, or a coding other than chunked (Twisted ignores identity's body).
    request(b"POST", b"Transfer-Encoding: identity, chunked", body=CHUNKED_BODY),
    request(b"POST", b"Transfer-Encoding: gzip, chunked", body=CHUNKED_BODY),
    request(b"POST", b"Transfer-Encoding: identity", body=b"abc"),
    request(b"POST", b"Transfer-Encoding: gzip", body=b"abc"),
    request(b"POST", b"Transfer-Encoding: chunked;q=1", body=CHUNKED_BODY),
    request(b"POST", b"Transfer-Encoding : chunked", body=CHUNKED_BODY),
    # Content-Length and Transfer-Encoding together, in either order.
    request(b"POST", b"Content-Length: 3", b"Transfer-Encoding: chunked", body=CHUNKED_BODY),
    request(b"POST", b"Transfer-Encoding: chunked", b"Content-Length: 3", body=CHUNKED_BODY),
    request(b"POST", b"Transfer-Encoding: identity", b"Content-Length: 3", body=b"abc"),
    # Several Content-Length lines, differing or not, and malformed ones.
    request(b"POST", b"Content-Length: 3", b"Content-Length: 4", body=b"abcd"),
    request(b"POST", b"Content-Length: 3", b"Content-Length: 3", body=b"abc"),
    request(b"POST", b"Content-Length: 3, 3", body=b"abc"),
    request(b"POST", b"Content-Length: +3", body=b"abc"),
    request(b"POST", b"Content-Length: -1", body=b"abc"),
    request(b"POST", b"Content-Length: 0x3", body=b"abc"),
    request(b"GET", b"Content-Length: nope"),
    # Reads with a body.
    request(b"GET", b"Content-Length: 1", body=b"a"),
    request(b"GET", b"Content-Length: 00"),
    request(b"GET", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
    request(b"GET", b"Transfer-Encoding: identity"),
    # Folded lines (obs-fold) are joined with a space: a folded Host or Content-Length
    # is then malformed.
    request(b"GET", b" b"),  # continues the Host line: "a b"
    request(b"POST", b"Content-Length: 3", b" 4", body=b"abcd"),
    # Host: one, well formed, present.
    b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a/b\r\n\r\n",
    b"GET /x HTTP/1.1\r\n\r\n",
]


@pytest.mark.parametrize("raw", REFUSED, ids=[raw.split(b"\r\n\r\n")[0][:90] for raw in REFUSED])
def test_ambiguous_framing_is_refused_and_nothing_after_it_is_read(raw: bytes) -> None:
    output, closed = serve(raw + NEXT)
    assert output.startswith(b"HTTP/1.1 400 Bad Request\r\n"), output
    assert len(STATUS_LINE.findall(output)) == 1  # the smuggled request got no answer
    assert b"got " not in output and b"smuggled" not in output
    head, _, body = output.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head
    assert json.loads(body)["errors"][0]["code"] == "REQUEST_INVALID"
    assert closed


ACCEPTED = [
    (request(b"POST", b"Transfer-Encoding: chunked", body=CHUNKED_BODY), b"abc"),
    (request(b"POST", b"Transfer-Encoding: CHUNKED", body=CHUNKED_BODY), b"abc"),
    (request(b"POST", b"Transfer-Encoding:\tchunked", body=CHUNKED_BODY), b"abc"),
    (request(b"POST", b"Content-Length: 3", body=b"abc"), b"abc"),
    (request(b"POST"), b""),
    (request(b"GET", b"Content-Length: 0"), b""),
    (request(b"HEAD", b"Content-Length: 0"), None),
    (b"GET /x HTTP/1.0\r\n\r\n", b""),
    # A folded line of another header stays that header's (RFC 9112 section 5.2).
    (request(b"GET", b"X-Note: a", b" b"), b""),
]


@pytest.mark.parametrize("raw, body", ACCEPTED, ids=[raw[:90] for raw, _ in ACCEPTED])
def test_unambiguous_framing_is_served_and_the_connection_stays_open(
    raw: bytes, body: bytes | None
) -> None:
    keep_alive = raw.startswith((b"GET", b"POST", b"HEAD")) and b"HTTP/1.0" not in raw
    output, closed = serve(raw + (NEXT if keep_alive else b""))
    assert output.split(b"\r\n")[0].endswith(b" 200 OK"), output
    if body is not None:
        first = output.split(b"\r\n\r\n")[1]
        assert first == b"got: " + body or first.startswith(b"got: " + body + b"HTTP/1.1 ")
    if keep_alive:
        assert len(STATUS_LINE.findall(output)) == 2  # the next request was answered too
        assert not closed


def test_a_folded_transfer_encoding_is_refused() -> None:
    output, closed = serve(request(b"POST", b"Transfer-Encoding:", b" chunked") + CHUNKED_BODY)
    assert output.startswith(b"HTTP/1.1 400 ") and closed
