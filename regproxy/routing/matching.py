"""Which route answers a request, and how names and scopes look from that route (pure).

A request is matched by containerd's ``?ns=`` first, then by its Host (port ignored), then
by the first component of the repository name, then by the default route. A route found
through its ``path`` is *mounted*: clients name its repositories with the path component
(``hub/library/alpine``) and every name the proxy hands back must carry it again. A route
found any other way sees names as they are. ``Mount`` is that view of a route; everything
that turns names or scopes between client and upstream goes through one.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

import attrs

from ..config import AuthConfig, ConfigError, LimitsConfig, Route
from ..protocol.errors import OCIError
from ..protocol.mount import Mount
from ..protocol.scope import Scope, split_scopes


class MatchedBy(enum.Enum):
    NAMESPACE = "namespace"
    HOST = "host"
    PATH = "path"
    DEFAULT = "default"


@attrs.frozen
class RouteMatch:
    """The route that answers a request and the repository name within that route."""

    mount: Mount
    # Without the path component; "" for requests that name no repository (/v2/, _catalog).
    name: str
    by: MatchedBy

    @property
    def route(self) -> Route:
        return self.mount.route

    @property
    def allowed(self) -> bool:
        """Whether the allow-list admits ``name``; requests without a name are always allowed."""
        return not self.name or self.route.allows(self.name)

    @property
    def upstream_name(self) -> str:
        """The upstream repository; "" when the request names none."""
        return self.route.upstream_name(self.name) if self.name else ""


def allowed(route: Route, client_name: str) -> bool:
    """Whether ``route`` serves ``client_name`` (named without the route's path component)."""
    return route.allows(client_name)


def route_scopes(route: Route, values: Iterable[str]) -> list[str]:
    """Token scopes of an unmounted client of ``route``, rewritten for its upstream."""
    return Mount(route).upstream_scopes(values)


def request_host(host: str) -> str:
    """A Host header's host name: port dropped, lower case, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def host_matches(pattern: str, host: str) -> bool:
    """``example.com`` matches itself; ``*.example.com`` matches any name below it."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def conflicts(routes: Sequence[Route], numbers: Sequence[int] | None = None) -> list[str]:
    """Why these routes cannot be served together; empty when each request has one route.

    ``numbers`` are the routes' positions in the file, when some were left out.
    """
    errors = []
    seen: dict[tuple[str, str], Route] = {}
    if numbers is None:
        numbers = range(1, len(routes) + 1)
    position = {id(route): number for route, number in zip(routes, numbers, strict=True)}
    for route in routes:
        keys = [
            ("name", route.name),
            ("host", route.host),
            ("path", route.path),
            ("namespace", route.namespace),
        ]
        if route.is_default:
            keys.append(("default", ""))
        for kind, value in keys:
            if value is None:
                continue
            other = seen.setdefault((kind, value.lower()), route)
            if other is route:
                continue
            if kind == "name":
                errors.append(
                    f"routes #{position[id(other)]} and #{position[id(route)]} are both "
                    f'named "{route.name}"'
                )
            elif kind == "default":
                errors.append(
                    f'routes "{other.name}" and "{route.name}" are both default routes '
                    "(neither has host, path nor namespace): give one of them a selector"
                )
            else:
                errors.append(
                    f'routes "{other.name}" and "{route.name}" both have {kind} = "{value}"'
                )
    return errors


@attrs.frozen
class RouteTable:
    """Every route of the running configuration, and the rule that picks one per request."""

    routes: tuple[Route, ...]
    # The file's [auth] and [limits] (or --htpasswd): reloaded with the routes they govern.
    auth: AuthConfig | None = attrs.field(default=None, kw_only=True)
    limits: LimitsConfig | None = attrs.field(default=None, kw_only=True)
    cache_store: str | None = attrs.field(default=None, kw_only=True)  # top-level cache_store
    _by_name: dict[str, Route] = attrs.field(init=False, eq=False, repr=False)
    _by_path: dict[str, Route] = attrs.field(init=False, eq=False, repr=False)
    _by_namespace: dict[str, Route] = attrs.field(init=False, eq=False, repr=False)
    # Exact hosts first, then wildcards longest first: the most specific pattern wins.
    _hosts: tuple[tuple[str, Route], ...] = attrs.field(init=False, eq=False, repr=False)
    default: Route | None = attrs.field(init=False, eq=False)
    _default_mount: Mount | None = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        errors = conflicts(self.routes)
        if not self.routes:
            errors.append("no routes: give at least one [[routes]] table")
        if errors:
            raise ConfigError(errors)
        hosts = [(route.host.lower(), route) for route in self.routes if route.host]
        hosts.sort(key=lambda item: (item[0].startswith("*."), -len(item[0])))
        set_ = object.__setattr__  # attrs' own way to fill derived fields of a frozen class
        set_(self, "_by_name", {route.name: route for route in self.routes})
        set_(self, "_by_path", {route.path: route for route in self.routes if route.path})
        set_(
            self,
            "_by_namespace",
            {route.namespace.lower(): route for route in self.routes if route.namespace},
        )
        set_(self, "_hosts", tuple(hosts))
        set_(self, "default", next((r for r in self.routes if r.is_default), None))
        shadowed = frozenset(route.path for route in self.routes if route.path)
        set_(self, "_default_mount", Mount(self.default, None, shadowed) if self.default else None)

    def by_name(self, name: str) -> Route | None:
        return self._by_name.get(name)

    def match(
        self, host: str | None, namespace: str | None, path_name: str | None
    ) -> RouteMatch | None:
        """The route for a request, or None (answer ``404 NAME_UNKNOWN``).

        ``host`` is the Host header as received, ``namespace`` the ``?ns=`` value,
        ``path_name`` the repository name of the path (None for ``/v2/`` and
        ``_catalog``). A first component naming a path route with nothing after it is no
        repository of that route, and it is not handed to the default route either: the
        path route shadows it.
        """
        name = path_name or ""
        if namespace:
            route = self._by_namespace.get(namespace.strip().lower())
            if route is not None:
                return RouteMatch(Mount(route), name, MatchedBy.NAMESPACE)
        if host:
            wanted = request_host(host)
            for pattern, route in self._hosts:
                if host_matches(pattern, wanted):
                    return RouteMatch(Mount(route), name, MatchedBy.HOST)
        if path_name:
            first, _, rest = path_name.partition("/")
            route = self._by_path.get(first)
            if route is not None:
                if not rest:
                    return None
                return RouteMatch(Mount(route, first), rest, MatchedBy.PATH)
        if self._default_mount is not None:
            return RouteMatch(self._default_mount, name, MatchedBy.DEFAULT)
        return None

    def token_mount(self, rest: str, scopes: Iterable[str] = ()) -> Mount | None:
        """The mount a ``/_token/<rest>`` request is for; None: answer 404.

        ``rest`` is a route name (``Mount.token_path``), a route name and its path, or
        empty. docker and containers/image (skopeo, podman) take the realm from their
        ``/v2/`` ping, not from the request that needed the token, so the realm of the
        default route (and the empty one, for a proxy without a default route) also
        receives scopes of path routes: like ``/v2/`` requests, they go to the path route
        their first repository scope names, and otherwise to the default route.
        """
        name, _, path = rest.strip("/").partition("/")
        route = self.by_name(name) if name else None
        if name and route is None:
            return None
        if route is not None and path:
            return Mount(route, path) if path == route.path else None
        if route is not None and not route.is_default:
            return Mount(route)
        for text in split_scopes(scopes):
            try:
                scope = Scope.parse(text)
            except OCIError:
                continue
            if scope.is_repository:
                match = self.match(None, None, scope.name)
                if match is not None and match.by is MatchedBy.PATH:
                    return match.mount
                break
        return self._default_mount


def unknown_name(name: str) -> OCIError:
    """The answer for a repository no route serves or the allow-list hides: both look missing."""
    return OCIError("NAME_UNKNOWN", "repository name not known to registry", {"name": name[:300]})
