"""Parsing and rendering of ``WWW-Authenticate`` (RFC 9110 section 11.6.1).

Registries send one or several challenges per header and sometimes several headers; values
may be quoted strings with backslash escapes. A regular expression on ``realm="..."``
gets these wrong, so this is a small tokenizer.
"""

from __future__ import annotations

import re

import attrs

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TOKEN68 = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_WS = " \t"


@attrs.frozen
class Challenge:
    scheme: str
    params: tuple[tuple[str, str], ...] = ()
    token68: str | None = None

    def get(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return None

    def with_param(self, name: str, value: str) -> Challenge:
        params = tuple((k, value if k == name else v) for k, v in self.params)
        return attrs.evolve(self, params=params)

    @property
    def is_bearer(self) -> bool:
        return self.scheme.lower() == "bearer"

    def render(self) -> str:
        if self.token68 is not None:
            return f"{self.scheme} {self.token68}"
        if not self.params:
            return self.scheme
        rendered = ",".join(f"{key}={quote(value)}" for key, value in self.params)
        return f"{self.scheme} {rendered}"


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip(self, chars: str = _WS) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def match(self, pattern: re.Pattern[str]) -> str | None:
        found = pattern.match(self.text, self.pos)
        if found is None:
            return None
        self.pos = found.end()
        return found.group()

    def quoted(self) -> str:
        """A quoted string starting at the current '"'; an unterminated one runs to the end."""
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == "\\" and self.pos < len(self.text):
                out.append(self.text[self.pos])
                self.pos += 1
            elif char == '"':
                break
            else:
                out.append(char)
        return "".join(out)

    def at_param(self) -> bool:
        """True when a ``name=`` follows (and not a token68 ending in '=')."""
        found = _TOKEN.match(self.text, self.pos)
        if found is None:
            return False
        rest = self.text[found.end() :].lstrip(_WS)
        return rest.startswith("=") and not rest.startswith("==")


def parse(value: str) -> list[Challenge]:
    """Every challenge in one header value; unparseable leftovers are skipped, not raised."""
    scanner = _Scanner(value)
    challenges: list[Challenge] = []
    while True:
        scanner.skip(_WS + ",")
        if not scanner.peek():
            return challenges
        scheme = scanner.match(_TOKEN)
        if scheme is None:
            # Not a challenge: skip to the next comma and try again.
            nxt = value.find(",", scanner.pos)
            scanner.pos = len(value) if nxt < 0 else nxt + 1
            continue
        scanner.skip()
        if not scanner.at_param():
            token68 = scanner.match(_TOKEN68)
            scanner.skip()
            if token68 is not None and scanner.peek() in (",", ""):
                challenges.append(Challenge(scheme, token68=token68))
                continue
            if token68 is not None:
                scanner.pos -= len(token68)
            challenges.append(Challenge(scheme))
            continue
        params: list[tuple[str, str]] = []
        while scanner.at_param():
            name = scanner.match(_TOKEN) or ""
            scanner.skip()
            scanner.pos += 1  # the '='
            scanner.skip()
            if scanner.peek() == '"':
                params.append((name.lower(), scanner.quoted()))
            else:
                params.append((name.lower(), scanner.match(_TOKEN) or ""))
            scanner.skip()
            if scanner.peek() != ",":
                break
            mark = scanner.pos
            scanner.skip(_WS + ",")
            if not scanner.at_param():
                scanner.pos = mark
                break
        challenges.append(Challenge(scheme, tuple(params)))


def parse_all(values: list[str]) -> list[Challenge]:
    return [challenge for value in values for challenge in parse(value)]
