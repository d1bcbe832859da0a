"""Which headers cross the proxy, and how the ones that name the upstream are rewritten."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

from twisted.web.http_headers import Headers

from . import challenge
from .errors import OCIError
from .scope import rewrite_down

# RFC 9110 section 7.6.1, plus the proxy-only ones; these describe one hop, never the next.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Only these client headers go upstream: content negotiation, conditional and ranged reads.
# Cookies, X-Forwarded-* and the like describe the client's hop and stay here.
FORWARDED_REQUEST_HEADERS = (
    b"accept",
    b"range",
    b"if-range",
    b"if-none-match",
    b"if-match",
    b"if-modified-since",
    b"if-unmodified-since",
)

# Upstream response headers that must not reach the client: hop-by-hop ones, framing the
# proxy's own HTTP layer decides, and those that only make sense from the upstream's own
# origin (its cookies, its HSTS policy, its alternative services): relayed, they would
# become the proxy's.
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | {
    b"set-cookie",
    b"set-cookie2",
    b"server",
    b"date",
    b"alt-svc",
    b"strict-transport-security",
    b"public-key-pins",
}

# The upstream's own Content-Encoding, hidden from treq's decoder so the bytes pass as sent
# (see regproxy.upstream.treq_client).
HIDDEN_CONTENT_ENCODING = b"x-regproxy-upstream-content-encoding"
USER_AGENT = b"regproxy/0.1"


def user_agent(client_host: bytes) -> bytes:
    """The proxy's part of the upstream User-Agent (the client's own follows it): the
    original's ``customDomain/<Host>`` marker tells the upstream whose domain it serves."""
    return USER_AGENT + b" customDomain/" + client_host


_RANGE = re.compile(rb"bytes=(\d{0,19})-(\d{0,19})")


def validate_range(headers: Headers) -> None:
    """One ``bytes=`` range or none: multi-range and malformed ranges never go upstream.

    Registries serve single ranges; a list of hundreds of overlapping ranges is a
    resource-exhaustion shape, and malformed ones draw 5xx answers from some upstreams.
    """
    values = headers.getRawHeaders(b"range")
    if values is None:
        return
    match = _RANGE.fullmatch(values[0].strip()) if len(values) == 1 else None
    if match is None or match.group(1) == match.group(2) == b"":
        raise OCIError("RANGE_INVALID", "only a single bytes range is supported")
    first, last = match.groups()
    if first and last and int(first) > int(last):
        raise OCIError("RANGE_INVALID", "the range ends before it starts")


def connection_tokens(headers: Headers) -> set[bytes]:
    """Headers named in ``Connection`` are hop-by-hop too."""
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        tokens.update(token.strip().lower() for token in value.split(b","))
    return tokens


def upstream_request_headers(client: Headers, user_agent: bytes) -> Headers:
    out = Headers()
    for name in FORWARDED_REQUEST_HEADERS:
        values = client.getRawHeaders(name)
        if values:
            out.setRawHeaders(name, values)
    agent = client.getRawHeaders(b"user-agent", [b""])[0]
    out.setRawHeaders(b"user-agent", [user_agent + b" " + agent if agent else user_agent])
    return out


def response_headers(upstream: Headers) -> list[tuple[bytes, Sequence[bytes]]]:
    """The upstream response headers that may be passed on, untouched (rewrites come after)."""
    dropped = DROPPED_RESPONSE_HEADERS | connection_tokens(upstream)
    out = []
    for name, values in upstream.getAllRawHeaders():
        lower = name.lower()
        if lower == b"content-encoding":
            # What treq's decoder left behind (often an empty value); the real one is hidden.
            continue
        if lower == HIDDEN_CONTENT_ENCODING:
            name = b"Content-Encoding"
        elif lower in dropped:
            continue
        out.append((name, values))
    return out


def rewrite_challenges(
    values: list[str],
    realm: str,
    client_name: Callable[[str], str | None],
    scrub: Callable[[str], str] | None = None,
) -> list[str]:
    """Point every Bearer realm at the proxy's token endpoint, strip prefixes from scopes,
    and pass ``error_description`` through ``scrub`` (it may name the prefixed resource)."""
    out = []
    for value in values:
        challenges = challenge.parse(value)
        if not challenges:
            out.append(value)
            continue
        rendered = []
        for item in challenges:
            if item.is_bearer:
                if item.get("realm") is not None:
                    item = item.with_param("realm", realm)
                scope = item.get("scope")
                if scope is not None:
                    item = item.with_param("scope", rewrite_down(scope, client_name))
                description = item.get("error_description")
                if description is not None and scrub is not None:
                    item = item.with_param("error_description", scrub(description))
            rendered.append(item.render())
        out.append(", ".join(rendered))
    return out


_LINK_TARGET = re.compile(r"<([^>]*)>")
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def origin_of(scheme: str, netloc: str) -> str:
    """``scheme://host[:port]`` lower-cased, without the scheme's default port."""
    scheme, netloc = scheme.lower(), netloc.lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default and netloc.endswith(default):
        netloc = netloc[: -len(default)]
    return f"{scheme}://{netloc}"


class URLRewriter:
    """Maps upstream URLs (Location, Link) to what a client of the proxy should see."""

    def __init__(
        self,
        upstream_origin: str,
        request_url: str,
        public_base: str,
        client_name: Callable[[str], str | None],
    ) -> None:
        self.upstream_origin = upstream_origin
        self.request_url = request_url
        self.public_base = public_base
        self.client_name = client_name

    def location(self, value: str) -> str:
        """Absolute always; back through the proxy when it names an upstream ``/v2/`` path."""
        absolute = urljoin(self.request_url, value)
        return self._through_proxy(absolute) or absolute

    def link(self, value: str) -> str:
        def replace(match: re.Match[str]) -> str:
            target = urljoin(self.request_url, match.group(1))
            proxied = self._through_proxy(target)
            if proxied is None:
                return match.group(0)
            # Pagination links are kept relative, as registries send them.
            parts = urlsplit(proxied)
            return "<" + urlunsplit(("", "", parts.path, parts.query, "")) + ">"

        return _LINK_TARGET.sub(replace, value)

    def _through_proxy(self, absolute: str) -> str | None:
        parts = urlsplit(absolute)
        if origin_of(parts.scheme, parts.netloc) != origin_of(*self.upstream_origin.split("://")):
            return None
        path = self._client_path(parts.path)
        if path is None:
            return None
        query = parts.query
        if path == "/v2/_catalog" and query:
            query = self._catalog_query(query)
        return self.public_base + urlunsplit(("", "", path, query, ""))

    def _client_path(self, path: str) -> str | None:
        if not path.startswith("/v2/"):
            return None
        if path in ("/v2/", "/v2/_catalog"):
            return path
        for marker in ("/manifests/", "/blobs/", "/tags/list", "/referrers/"):
            index = path.rfind(marker)
            if index > len("/v2/"):
                name = self.client_name(path[len("/v2/") : index])
                if name is None:
                    return None
                return f"/v2/{name}{path[index:]}"
        return None

    def _catalog_query(self, query: str) -> str:
        pairs = []
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key == "last":
                value = self.client_name(value) or value
            pairs.append((key, value))
        return urlencode(pairs)
