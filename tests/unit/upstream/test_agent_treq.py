"""treq's per-request work that regproxy skips (regproxy.upstream.treq_client.ProxyHTTPClient)."""

from __future__ import annotations

from typing import Any

from hyperlink import EncodedURL
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from regproxy.upstream.treq_client import NoCookies, ProxyHTTPClient, SentAsIs, wire_url


@implementer(IAgent)
class RecordingAgent:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes, Headers | None]] = []

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        self.sent.append((method, uri, headers))
        return Deferred()


def treq_uri(url: str) -> str:
    """What treq's own encoding makes of a URL."""
    return str(EncodedURL.from_text(url).to_uri().to_text())


SAFE = "abcXYZ019-._~:/?@!$&'()*+,;=%"
URLS = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}/{path}",
    st.sampled_from(["http", "https"]),
    st.sampled_from(["127.0.0.1", "registry.example", "[::1]", "xn--bcher-kva.example"]),
    st.sampled_from(["", ":5000", ":443"]),
    st.text(alphabet=SAFE + '[]|{}^`"<> \\AÄ', max_size=40),
)


@given(URLS)
def test_a_url_sent_as_is_is_what_treq_would_have_sent(url: str) -> None:
    prepared = wire_url(url)
    if isinstance(prepared, SentAsIs):
        try:
            expected = treq_uri(url)
        except UnicodeError:
            # IDNA refuses IPv6 literals ("[::1]"): treq cannot send to one, the proxy can.
            expected = str(EncodedURL.from_text(url).to_text())
        assert prepared.to_uri().to_text() == expected
    else:
        assert prepared == url  # left to treq's own encoding


def test_urls_that_need_encoding_are_left_to_treq() -> None:
    for url in (
        "http://Registry.example/v2/",  # upper-case host: IDNA lower-cases it
        "http://registry.example/v2/x/tags/list?last=a[b]",
        "http://registry.example/v2/x y",
        "http://bücher.example/v2/",
    ):
        assert not isinstance(wire_url(url), SentAsIs), url


def test_treq_sends_the_prepared_url_byte_for_byte() -> None:
    """Fails if a treq upgrade stops taking an EncodedURL's own URI form."""
    agent = RecordingAgent()
    client = ProxyHTTPClient(agent, cookiejar=NoCookies())  # type: ignore[arg-type]
    url = "https://127.0.0.1:5000/v2/a/b/blobs/sha256:00ff?X-Amz-Signature=a%2Fb&n=1"
    client.request("GET", url, unbuffered=True, allow_redirects=False)
    client.request("GET", url.encode("ascii"), unbuffered=True, allow_redirects=False)
    client.request("GET", "http://Registry.example/v2/", unbuffered=True, allow_redirects=False)
    assert [uri for _, uri, _ in agent.sent] == [
        url.encode("ascii"),
        url.encode("ascii"),
        b"http://registry.example/v2/",
    ]


def test_no_cookie_reaches_the_upstream_and_none_is_kept() -> None:
    agent = RecordingAgent()
    jar = NoCookies()
    client = ProxyHTTPClient(agent, cookiejar=jar)  # type: ignore[arg-type]
    client.request("GET", "http://127.0.0.1:5000/v2/", cookies={"session": "x"}, unbuffered=True)
    client.request("GET", "http://127.0.0.1:5000/v2/", unbuffered=True)
    assert list(jar) == []
    for _, _, headers in agent.sent:
        assert headers is not None and not headers.hasHeader(b"cookie")
    assert list(ProxyHTTPClient._NO_COOKIES) == []


def test_a_url_asked_for_again_is_not_parsed_again() -> None:
    url = "http://127.0.0.1:5000/v2/app/manifests/latest"
    assert wire_url(url) is wire_url(url)
    assert wire_url(url.encode("ascii")) is wire_url(url)
