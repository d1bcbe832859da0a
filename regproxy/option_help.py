"""``twist regproxy --help``: regproxy's own usage line and its options under headings.

Twisted's help lists every option alphabetically under Twisted's own usage line
(``twist [options] plugin [plugin_options] regproxy [options]``), appends each coerce
function's sentence and a ``[default: ...]`` after the option's help. regproxy's help is
read by people choosing a setting, so options are grouped by what they configure, in the
order of ``GROUPS``, and each shows its help text alone: the text says its default itself.

The grouping is data: an option missing from ``GROUPS`` (and not ``HIDDEN``) fails
``tests/unit/test_options.py``, so a new option cannot slip into the help unsorted.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator

import attrs
from twisted.python import usage

SYNOPSIS = "Usage: twist regproxy [options]"


@attrs.frozen
class Group:
    """A heading of the help and its options, each ``name`` or ``name=METAVAR``.

    A parameter (an option that takes a value) has a metavar naming what to give; a flag
    has none.
    """

    heading: str
    options: tuple[str, ...]

    def entries(self) -> Iterator[tuple[str, str | None]]:
        """(long name, metavar or None) for each option, in order."""
        for entry in self.options:
            name, _, metavar = entry.partition("=")
            yield name, metavar or None


GROUPS = (
    Group(
        "Listeners",
        (
            "port=ENDPOINT",
            "metrics-port=ENDPOINT",
            "public-url=URL",
            "trusted-proxy=CIDR",
            "idle-timeout=SECONDS",
        ),
    ),
    Group(
        "Upstream",
        (
            "upstream=URL",
            "repo-prefix=PATH",
            "upstream-ca=FILE",
            "blob-redirects=MODE",
            "disable-browser-redirects",
            "upstream-timeout=SECONDS",
        ),
    ),
    Group(
        "Credentials",
        (
            "upstream-username=NAME",
            "upstream-password-file=FILE",
            "upstream-credentials-dir=DIR",
            "auth-header=VALUE",
            "google-credentials=FILE",
            "google-adc",
            "google-json-key",
        ),
    ),
    Group("Routes", ("config=FILE", "check")),
    Group(
        "Cache",
        (
            "cache-dir=DIR",
            "cache-store=URL",
            "cache-max-size=SIZE",
            "cache-tag-ttl=SECONDS",
            "cache-stale-max-age=SECONDS",
            "cache-public-ttl=SECONDS",
            "cache-abandoned-limit=SIZE",
            "cache-scrub-interval=SECONDS",
            "cache-verify",
        ),
    ),
    Group("Access", ("htpasswd=FILE", "insecure-auth")),
    Group(
        "Operations",
        (
            "workers=N",
            "shutdown-grace=SECONDS",
            "drain-delay=SECONDS",
            "log-format=FORMAT",
            "version",
            "help",
        ),
    ),
)
# Options the program sets for itself: accepted, never shown.
HIDDEN = frozenset({"as-worker"})


def option_names(options: usage.Options) -> dict[str, bool]:
    """Every long option of ``options``: whether it takes a value, by name."""
    return {name.rstrip("="): name.endswith("=") for name in options.longOpt}


def ungrouped(options: usage.Options) -> list[str]:
    """Options that ``GROUPS`` does not place (the help would leave them out)."""
    placed = {name for group in GROUPS for name, _ in group.entries()} | HIDDEN
    return sorted(set(option_names(options)) - placed)


def help_sentence(options: usage.Options, name: str) -> str:
    """An option's help on one line (docstrings of ``opt_`` methods span several)."""
    return " ".join(str(options.docs.get(name) or "").split())


def usage_text(options: usage.Options, width: int | None = None) -> str:
    """The help below the usage line: the description, then each group of options."""
    width = width or int(os.environ.get("COLUMNS", "80"))
    names = option_names(options)
    shorts = {long: short for short, long in options.synonyms.items() if len(short) == 1}
    groups = []
    for group in GROUPS:
        rows = []
        for name, metavar in group.entries():
            if name not in names:
                continue  # an option another part of regproxy has yet to add
            short = f"-{shorts[name]}, " if name in shorts else "    "
            rows.append((f"  {short}--{name}" + (f"={metavar}" if metavar else ""), name))
        if rows:
            groups.append((group.heading, rows))
    # One column for every group, so the help reads as one table; longer options take a
    # line of their own.
    column = min(max(len(left) for _, rows in groups for left, _ in rows) + 2, _MAX_COLUMN)
    sections = []
    longdesc = getattr(options, "longdesc", "")
    if longdesc:
        sections.append("\n".join(textwrap.wrap(longdesc, width, break_on_hyphens=False)))
    for heading, rows in groups:
        sections.append(f"{heading}:\n" + _table(options, rows, column, width))
    return "\n" + "\n\n".join(sections) + "\n"


_MAX_COLUMN = 32


def _table(options: usage.Options, rows: list[tuple[str, str]], column: int, width: int) -> str:
    """Options in a left column, their help wrapped beside them (below, when too long)."""
    indent = " " * column
    lines = []
    for left, name in rows:
        # Whole words only: option names and URLs hold hyphens.
        wrapped = textwrap.wrap(
            help_sentence(options, name), max(width - column, 20), break_on_hyphens=False
        )
        if len(left) + 2 > column:
            lines.append(left)
        else:
            first = wrapped.pop(0) if wrapped else ""
            lines.append(f"{left:<{column}}{first}".rstrip())
        lines.extend(indent + line for line in wrapped)
    return "\n".join(lines)
