"""Who may pull what: a route's ``[[routes.access]]`` rules, compiled once per configuration.

A principal is a string: ``""`` for anonymous, a user name of the htpasswd file, or
``<oidc name>:<claim value>`` for a workload identity (user names never hold a colon).
Rules are tried in order; the first whose ``repos`` match the repository decides, and
no match denies. A route with no rules admits ``users`` only (closed by default).
``anonymous`` admits everyone (a client that logged in may pull what anybody may).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import attrs

from ..config import AccessRule, Route, compile_globs

ANONYMOUS = ""
USERS_ONLY = (AccessRule(("**",), ("users",)),)


def subject_pattern(glob: str) -> re.Pattern[str]:
    """An OIDC subject glob: ``*`` matches any run of characters (subjects hold ``/``
    and ``:``: ``repo:acme/app:ref:refs/heads/main``); everything else is literal."""
    return re.compile(".*".join(re.escape(part) for part in glob.split("*")))


@attrs.frozen
class Who:
    """One rule's ``pull`` list, compiled."""

    anonymous: bool
    users: bool
    names: frozenset[str]
    groups: frozenset[str]
    subjects: tuple[tuple[str, re.Pattern[str]], ...]

    @classmethod
    def compile(cls, principals: Sequence[str]) -> Who:
        names, groups, subjects = set(), set(), []
        for principal in principals:
            if principal.startswith("@"):
                groups.add(principal[1:])
            elif ":" in principal:
                issuer, _, glob = principal.partition(":")
                subjects.append((issuer + ":", subject_pattern(glob)))
            elif principal not in ("anonymous", "users"):
                names.add(principal)
        return cls(
            anonymous="anonymous" in principals,
            users="users" in principals,
            names=frozenset(names),
            groups=frozenset(groups),
            subjects=tuple(subjects),
        )

    def admits(self, principal: str, groups: frozenset[str]) -> bool:
        if self.anonymous:
            return True
        if principal == ANONYMOUS:
            return False
        if self.users or principal in self.names or not self.groups.isdisjoint(groups):
            return True
        for prefix, pattern in self.subjects:
            if principal.startswith(prefix) and pattern.fullmatch(principal, len(prefix)):
                return True
        return False


@attrs.frozen
class RouteRules:
    """A route's rules: (repository pattern, who) pairs, first match wins."""

    rules: tuple[tuple[re.Pattern[str] | None, Who], ...]
    # Docker Hub keeps official images under library/: rules see the full name, as allow does.
    library_names: bool = False

    @classmethod
    def of(cls, route: Route) -> RouteRules:
        compiled = tuple(
            (compile_globs(rule.repos), Who.compile(rule.pull))
            for rule in (route.access or USERS_ONLY)
        )
        return cls(compiled, route.library_names)

    def who(self, name: str) -> Who | None:
        """Who may pull ``name`` (named within the route); None: nobody."""
        if self.library_names and "/" not in name:
            name = f"library/{name}"
        for pattern, who in self.rules:
            if pattern is None or pattern.fullmatch(name):
                return who
        return None

    def admits(self, principal: str, groups: frozenset[str], name: str) -> bool:
        who = self.who(name)
        return who is not None and who.admits(principal, groups)


def memberships(groups: Mapping[str, Sequence[str]]) -> dict[str, frozenset[str]]:
    """Principal -> the groups that list it."""
    found: dict[str, set[str]] = {}
    for group, members in groups.items():
        for member in members:
            found.setdefault(member, set()).add(group)
    return {member: frozenset(names) for member, names in found.items()}
