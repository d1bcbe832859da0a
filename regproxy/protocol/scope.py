"""Token scopes (``type:name:actions``), rewritten between client names and upstream names.

A name may contain ``host:port``, so the type ends at the first colon and the actions start
after the last one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs

from .errors import OCIError
from .reference import NAME_RE


@attrs.frozen
class Scope:
    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope:
        first, last = text.find(":"), text.rfind(":")
        if first <= 0 or last == first:
            raise OCIError("REQUEST_INVALID", "malformed scope", {"scope": text[:300]})
        actions = tuple(action for action in text[last + 1 :].split(",") if action)
        return cls(text[:first], text[first + 1 : last], actions)

    @property
    def is_repository(self) -> bool:
        # "repository(plugin)" is the resource-class form of the same thing.
        return self.type == "repository" or self.type.startswith("repository(")

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


def split_scopes(values: Iterable[str]) -> list[str]:
    """Scopes arrive as repeated parameters, space-separated in one, or both."""
    return [scope for value in values for scope in value.split()]


def rewrite_up(values: Iterable[str], upstream_name: Callable[[str], str]) -> list[str]:
    """Client scopes to upstream scopes: prefixed names, and pull only (the proxy is read-only).

    A repository scope that asks for nothing readable is dropped rather than forwarded.
    """
    rewritten = []
    for text in split_scopes(values):
        scope = Scope.parse(text)
        if not scope.is_repository:
            rewritten.append(str(scope))
            continue
        if not NAME_RE.fullmatch(scope.name):
            raise OCIError(
                "NAME_INVALID", "invalid repository name in scope", {"scope": text[:300]}
            )
        if not {"pull", "*"} & set(scope.actions):
            continue
        rewritten.append(str(Scope(scope.type, upstream_name(scope.name), ("pull",))))
    return rewritten


def rewrite_down(value: str, client_name: Callable[[str], str | None]) -> str:
    """Upstream challenge scopes to client scopes: the prefix never reaches a client."""
    out = []
    for text in value.split():
        try:
            scope = Scope.parse(text)
        except OCIError:
            out.append(text)
            continue
        name = client_name(scope.name) if scope.is_repository else None
        out.append(str(attrs.evolve(scope, name=name)) if name is not None else text)
    return " ".join(out)
