"""A route as its clients see it: at the top of ``/v2/`` or mounted under its path
component (``hub/library/alpine``), and how names and scopes turn between the client's view
and the upstream's. Everything that rewrites a name or a scope goes through a Mount."""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from ..config import Route
from .reference import NAME_RE
from .scope import Scope, rewrite_down, rewrite_up, split_scopes


@attrs.frozen
class Mount:
    """A route as its clients see it: at the top of ``/v2/`` or under its path component."""

    route: Route
    path: str | None = None
    # For the default route: first components that belong to path routes. A client cannot
    # reach the default route's repositories under them (see ``RouteTable.match``).
    shadowed: frozenset[str] = frozenset()

    def route_name(self, client_name: str) -> str | None:
        """A client's repository name without the path component; None when outside it."""
        if self.path is None:
            if client_name.partition("/")[0] in self.shadowed:
                return None
            return client_name
        head = self.path + "/"
        if client_name.startswith(head) and len(client_name) > len(head):
            return client_name[len(head) :]
        return None

    def client_name(self, upstream_name: str) -> str | None:
        """The name a client of this mount uses for an upstream repository.

        For tags/list ``name``, ``Link``, challenge scopes and error bodies. None when the
        repository is outside the route's prefix.
        """
        name = self.route.client_name(upstream_name)
        if name is None or self.path is None:
            return name
        return f"{self.path}/{name}"

    def catalog_name(self, upstream_name: str) -> str | None:
        """Like ``client_name``, and None for repositories the allow-list hides."""
        name = self.route.client_name(upstream_name)
        if name is None or not self.route.allows(name):
            return None
        if self.path is None:
            return name if self.route_name(name) is not None else None
        return f"{self.path}/{name}"

    def upstream_name(self, client_name: str) -> str | None:
        """The upstream repository for a client's name; None outside the mount or allow-list."""
        name = self.route_name(client_name)
        if name is None or not self.route.allows(name):
            return None
        return self.route.upstream_name(name)

    def upstream_scopes(self, values: Iterable[str]) -> list[str]:
        """Client token scopes to the upstream's: prefixed names, pull only.

        Repository scopes the route may not serve (outside the mount or the allow-list)
        are dropped, as ``rewrite_up`` drops push-only ones: the upstream never hears of
        them. Malformed scopes and invalid names are still a 400, from ``rewrite_up``.
        """
        kept = []
        for text in split_scopes(values):
            scope = Scope.parse(text)
            if (
                scope.is_repository
                and NAME_RE.fullmatch(scope.name)
                and self.upstream_name(scope.name) is None
            ):
                continue
            kept.append(text)
        return rewrite_up(kept, self._known_upstream_name)

    def _known_upstream_name(self, client_name: str) -> str:
        # upstream_scopes has dropped every name for which this is None.
        name = self.upstream_name(client_name)
        assert name is not None
        return name

    def client_scopes(self, value: str) -> str:
        """An upstream challenge's ``scope`` value in this mount's client names."""
        return rewrite_down(value, self.client_name)

    @property
    def token_path(self) -> str:
        """The path of this mount's token realm, below the proxy's public base URL.

        Mounted and unmounted clients name the same repository differently
        (``hub/library/alpine`` and ``library/alpine``), so the realm says which one the
        scopes of a token request use; ``RouteTable.token_mount`` reads it back. The default
        route's realm also takes scopes for path routes: see ``RouteTable.token_mount``.
        """
        if self.path is None:
            return f"/_token/{self.route.name}"
        return f"/_token/{self.route.name}/{self.path}"
