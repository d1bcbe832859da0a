"""A validated client request, mapped to the request the upstream receives. Pure: no I/O.

Everything a client sends is checked here before anything is forwarded: the Range, the
pagination parameters, and the length of the repository name once the route's prefix is
added (a valid 255-character name becomes an invalid upstream name under a prefix, and
the distribution registry answers those with a 500).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

import attrs
from twisted.web.http_headers import Headers

from ..config import Route
from ..routing.matching import Mount
from ..upstream.client import user_agent
from . import headers
from .errors import OCIError
from .reference import MAX_NAME_LENGTH, Kind, RegistryPath, validate_name, validate_tag
from .rewrite import list_body_rewritten


@attrs.frozen
class UpstreamRequest:
    """What goes upstream for one client request (credentials are added when sending)."""

    method: str
    url: str
    headers: Headers = attrs.field(eq=False)
    # The token scope this request needs, for the proxy's own credentials.
    scope: str
    upstream_name: str | None


def upstream_query(target: RegistryPath, route: Route, raw_query: bytes) -> str:
    """Validate the pagination parameters and map catalog names to the upstream's."""
    try:
        pairs = parse_qsl(raw_query.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise OCIError("REQUEST_INVALID", "malformed query string") from None
    out = []
    for key, value in pairs:
        if key == "n" and not (value.isascii() and value.isdigit() and len(value) <= 6):
            raise OCIError("PAGINATION_NUMBER_INVALID", "n must be a non-negative integer")
        if key == "last" and value and target.kind is Kind.TAGS:
            validate_tag(value)
        if key == "last" and value and target.kind is Kind.CATALOG:
            value = route.upstream_name(validate_name(value)) if route.prefix else value
        out.append((key, value))
    if target.kind is Kind.CATALOG and route.prefix and not dict(out).get("last"):
        # Names under "prefix/" sort right after it: start there rather than at the top.
        out = [(key, value) for key, value in out if key != "last"]
        out.append(("last", route.prefix + "/"))
    return urlencode(out)


def scope_for(target: RegistryPath, upstream_name: str | None) -> str:
    if target.kind is Kind.CATALOG:
        return "registry:catalog:*"
    if upstream_name is None:
        return ""
    return f"repository:{upstream_name}:pull"


def upstream_name_of(target: RegistryPath, route: Route) -> str | None:
    if not target.name:
        return None
    name = route.upstream_name(target.name)
    if len(name) > MAX_NAME_LENGTH:
        raise OCIError(
            "NAME_INVALID",
            "repository name is too long for this registry",
            {"limit": MAX_NAME_LENGTH - (len(name) - len(target.name))},
        )
    return name


def map_request(
    *,
    method: bytes,
    target: RegistryPath,
    route: Route,
    raw_query: bytes,
    client_headers: Headers,
    client_host: bytes,
    mount: Mount | None = None,
    client_target: RegistryPath | None = None,
) -> UpstreamRequest:
    """The upstream request for a validated client request; raises OCIError for bad input.

    ``target`` names the repository within the route; ``client_target`` as the client
    did, which differs under a path route (``hub/library/alpine``), seen through ``mount``.
    """
    mount = mount or Mount(route)
    client_target = client_target or target
    headers.validate_range(client_headers)
    name = upstream_name_of(target, route)
    query = upstream_query(target, route, raw_query)
    url = route.upstream.origin + target.path(name)
    if query:
        url += "?" + query
    outgoing = headers.upstream_request_headers(client_headers, user_agent(client_host))
    # A HEAD whose GET body would be rewritten goes up as a GET (list bodies are small and
    # read whole anyway), so the client is told the length of the body it would get.
    rewritten = method == b"HEAD" and list_body_rewritten(client_target, mount, name)
    return UpstreamRequest(
        method="GET" if rewritten else method.decode("ascii"),
        url=url,
        headers=outgoing,
        scope=scope_for(target, name),
        upstream_name=name,
    )
