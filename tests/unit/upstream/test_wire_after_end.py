"""A body's reader after the body ended (regproxy.upstream._connection), in memory.

A reader may pause its body after the last bytes: a consumer whose buffer fills on them
(a client, an upload to the store) pauses its producer. By then the connection is back in
the pool, or already carries the next exchange: that pause must not reach its socket, or
the next answer on it never comes (the next request times out).
"""

from __future__ import annotations

from typing import Any

from twisted.web.client import ResponseDone

from tests.unit.upstream.test_wire import OK, Body, Conn, outcome


def ended_body(conn: Conn) -> Body:
    d = conn.send()
    conn.feed(OK)
    body = Body()
    outcome(d).deliverBody(body)
    assert body.reason is not None and body.reason.check(ResponseDone)
    assert conn.protocol in conn.idle
    return body


def flow(body: Body) -> Any:
    return body.transport


def test_pausing_an_ended_body_leaves_the_pooled_connections_socket_alone() -> None:
    conn = Conn()
    old = ended_body(conn)
    flow(old).pauseProducing()
    assert conn.transport.producerState == "producing"
    second = ended_body(conn)  # the next exchange on it is answered
    assert second.data == b"hello"


def test_an_ended_bodys_reader_cannot_pause_resume_or_stop_the_next_exchange() -> None:
    conn = Conn()
    old = ended_body(conn)
    d = conn.send()
    conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    body = Body(pause_first=True)
    outcome(d).deliverBody(body)
    assert conn.transport.producerState == "paused"
    flow(old).resumeProducing()  # the old reader's resume: the new reader still paused
    assert body.data == b"" and conn.transport.producerState == "paused"
    flow(body).resumeProducing()
    flow(old).pauseProducing()  # the old reader's pause: the new body still flows
    assert conn.transport.producerState == "producing"
    flow(old).stopProducing()  # nor closes the connection under it
    assert not conn.transport.disconnecting
    conn.feed(b"def")
    assert body.data == b"abcdef" and body.reason is not None
    assert body.reason.check(ResponseDone)
    assert conn.idle == [conn.protocol, conn.protocol]
