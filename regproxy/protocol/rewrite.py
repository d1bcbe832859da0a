"""An upstream answer, rewritten for the client. Pure: no I/O.

One rewriter serves the registry API and ``/_token`` alike: whatever names the upstream
(challenge realms and scopes, ``Location``, ``Link``, the ``name`` of tags/list, ``_catalog``
entries, error bodies) is mapped to what the client asked for, and headers that belong to
one hop or to the upstream's own origin are dropped. Blob and manifest bodies are never
touched: only small list and error bodies are, and only when there is something to change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
from twisted.web.http_headers import Headers

from ..routing.matching import Mount
from . import bodies, headers
from .reference import Kind, RegistryPath


def list_body_rewritten(target: RegistryPath, mount: Mount, upstream_name: str | None) -> bool:
    """Whether a successful list answer's body differs for the client (so it is rewritten).

    ``target`` names the repository as the client did (with a path route's component).
    """
    if target.kind is Kind.TAGS:
        return upstream_name != target.name
    route = mount.route
    return target.kind is Kind.CATALOG and bool(
        route.prefix or route.allow or mount.shadowed or mount.path
    )


def token_path(mount: Mount) -> str:
    """The realm path clients of this mount are sent to.

    The default route keeps the plain ``/_token`` (what a single-upstream proxy has always
    answered): that realm also takes scopes of path routes, see ``RouteTable.token_mount``.
    """
    if mount.path is None and mount.route.is_default:
        return "/_token"
    return mount.token_path


@attrs.frozen
class Rewritten:
    body: bytes
    # A _catalog page that ran past the prefix has no next page for the client.
    drop_link: bool = False
    # The cursor for the next _catalog page when the page's own last name is hidden.
    link_last: str | None = None


BodyRewrite = Callable[[bytes], Rewritten]


class ResponseRewriter:
    """Rewrites one upstream answer for one client request of one route."""

    def __init__(
        self,
        *,
        mount: Mount,
        target: RegistryPath | None,
        upstream_name: str | None,
        upstream_url: str,
        public_base: str,
    ) -> None:
        """``target`` is the request as the client named it (with a path route's component),
        ``upstream_name`` the repository it was mapped to upstream."""
        self.mount = mount
        self.route = mount.route
        self.target = target
        self.public_base = public_base
        self._asked = upstream_name
        name = target.name if target is not None else ""
        self._names: tuple[str, str] | None = (upstream_name, name) if upstream_name else None
        self._urls = headers.URLRewriter(
            self.route.upstream.origin, upstream_url, public_base, self.client_name
        )

    def client_name(self, upstream_name: str) -> str | None:
        """Map upstream names back, preferring the exact spelling this client used."""
        if self._asked is not None and upstream_name == self._asked and self.target is not None:
            return self.target.name
        return self.mount.client_name(upstream_name)

    def headers(self, upstream: Headers) -> list[tuple[bytes, Sequence[bytes]]]:
        out = []
        for name, values in headers.response_headers(upstream):
            lower = name.lower()
            if lower == b"www-authenticate":
                values = [
                    v.encode("latin-1")
                    for v in headers.rewrite_challenges(
                        [v.decode("latin-1") for v in values],
                        self.public_base + token_path(self.mount),
                        self.client_name,
                        self._scrubber(),
                    )
                ]
            elif lower == b"location":
                values = [
                    self._urls.location(v.decode("latin-1")).encode("latin-1") for v in values
                ]
            elif lower == b"link":
                values = [self._urls.link(v.decode("latin-1")).encode("latin-1") for v in values]
            out.append((name, values))
        return out

    def body(self, status: int, content_type: bytes) -> BodyRewrite | None:
        """How the body must change, or None to stream it untouched (the usual case)."""
        target = self.target
        if target is None:
            # Token services answer errors in shapes of their own: scrub any JSON.
            scrub_token = bodies.prefix_scrubber(self.route.prefix, None)
            if status >= 400 and b"json" in content_type and scrub_token is not None:
                return lambda body: Rewritten(
                    bodies.rewrite_errors(body, scrub_token, any_json=True)
                )
            return None
        if status == 200 and list_body_rewritten(target, self.mount, self._asked):
            if target.kind is Kind.TAGS:
                return lambda body: Rewritten(bodies.rewrite_tags(body, target.name))

            def catalog(body: bytes) -> Rewritten:
                rewritten, ran_past = bodies.rewrite_catalog(
                    body, self.route.client_name, shown=self.mount.catalog_name
                )
                listed = bodies.catalog_names(rewritten)
                return Rewritten(
                    rewritten, drop_link=ran_past, link_last=listed[-1] if listed else None
                )

            return catalog
        if status >= 400 and b"json" in content_type:
            scrub = self._scrubber()
            if scrub is not None:
                return lambda body: Rewritten(bodies.rewrite_errors(body, scrub))
        return None

    def _scrubber(self) -> Callable[[str], str] | None:
        return bodies.prefix_scrubber(self.route.prefix, self._names)
