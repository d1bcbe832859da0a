"""Anything outside the API: a person in a browser, sent to the upstream's own pages."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote, unquote

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..config import Route
from ..protocol.errors import OCIError
from .respond import write_error

DOCKER_HUB_PAGES = "https://hub.docker.com"


def upstream_page(route: Route, path: str) -> str:
    """Where a person who opens the proxy's address in a browser is sent.

    The page names the upstream repository, prefix included (that is what the upstream's
    own pages are called); ``--disable-browser-redirects`` keeps it to the proxy. The
    upstream's scheme is kept, so an http upstream gets an http link. Docker Hub's pages
    live elsewhere: official images (``library/...``) at ``/_/<name>``, others at ``/r/``.
    """
    name = "/".join(part for part in (route.prefix, path.strip("/")) if part)
    if not route.upstream.is_docker_hub:
        return "/".join(part for part in (route.upstream.origin, name) if part)
    if not name:
        return DOCKER_HUB_PAGES + "/"
    head, _, rest = name.partition("/")
    if head == "library" and rest:
        return f"{DOCKER_HUB_PAGES}/_/{rest}"
    if not rest and route.library_names:
        return f"{DOCKER_HUB_PAGES}/_/{name}"
    return f"{DOCKER_HUB_PAGES}/r/{name}"


def _has_dot_segments(path: bytes) -> bool:
    segments = unquote(path.decode("latin-1")).replace("\\", "/").split("/")
    return any(segment in (".", "..") for segment in segments)


class BrowserRedirect(Resource):
    isLeaf = True

    def __init__(
        self, route_for: Callable[[Request, str], tuple[Route, str] | None], enabled: bool
    ) -> None:
        """``route_for(request, path)`` is the route for a browser's path and the path
        within that route (a path route's component taken off), or None: no page."""
        super().__init__()
        self.route_for = route_for
        self.enabled = enabled

    def render(self, request: Request) -> int:
        if request.method not in (b"GET", b"HEAD"):
            write_error(request, OCIError("UNSUPPORTED", "only GET and HEAD are served"))
        elif not self.enabled or _has_dot_segments(request.path):
            # Traversal shapes are scanners, not people: no redirect for them.
            write_error(request, OCIError("NOT_FOUND", "not found"))
        elif (found := self.route_for(request, unquote(request.path.decode("latin-1")))) is None:
            write_error(request, OCIError("NOT_FOUND", "not found"))
        else:
            route, path = found
            # Re-quoted, so nothing in the path can end the header or add to it.
            target = quote(upstream_page(route, path), safe=":/@!$&'()*+,;=-._~")
            request.setResponseCode(307)
            request.setHeader(b"location", target.encode("ascii"))
            request.setHeader(b"content-length", b"0")
            request.finish()
        return NOT_DONE_YET


class NotFound(Resource):
    """A path the proxy keeps free (``/metrics`` when it has a listener of its own)."""

    isLeaf = True

    def render(self, request: Request) -> int:
        write_error(request, OCIError("NOT_FOUND", "not found"))
        return NOT_DONE_YET
