"""Summarise py-spy ``--format raw`` (collapsed stacks) output: the hottest functions.

``python -m bench.profile FILE [--top N] [--match regproxy/]``

Self: samples where the function was on top of the stack. Total: samples where it was
anywhere on the stack (counted once per sample). Percentages are of all non-idle samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::\d+)?\)$")


def _key(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{match.group('func')}"


def summarise(path: Path) -> tuple[int, Counter[str], Counter[str]]:
    self_: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_key(f) for f in stack.split(";")]
        samples += count
        self_[frames[-1]] += count
        for key in set(frames):
            total[key] += count
    return samples, self_, total


def by_module(path: Path) -> tuple[int, Counter[str]]:
    """Inclusive samples per source file (each file counted once per sample)."""
    files: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        samples += int(count_text)
        for key in {_key(f).rpartition(":")[0] for f in stack.split(";")}:
            files[key] += int(count_text)
    return samples, files


def render(path: Path, top: int = 15, match: str | None = None) -> str:
    samples, self_, total = summarise(path)
    lines = [f"{path}: {samples} samples"]
    _, files = by_module(path)
    lines.append("  inclusive by file (regproxy, treq, hyperlink, idna, logging, metrics):")
    for key, count in files.most_common():
        if key.startswith(
            (
                "regproxy/",
                "treq/",
                "hyperlink/",
                "idna/",
                "twisted/logger/",
                "prometheus_client/",
                "twisted/web/client.py",
                "twisted/web/_newclient.py",
                "twisted/web/http.py",
                "twisted/web/server.py",
                "twisted/internet/tcp.py",
            )
        ):
            lines.append(f"    {100 * count / max(samples, 1):5.1f}%  {key}")
    for title, counter in (("self", self_), ("total (inclusive)", total)):
        lines.append(f"  top {title}{' matching ' + match if match else ''}:")
        items = [(k, v) for k, v in counter.most_common() if not match or match in k]
        for key, count in items[:top]:
            lines.append(f"    {100 * count / max(samples, 1):5.1f}%  {key}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--match", help="only functions whose file:function contains this")
    args = parser.parse_args()
    for path in args.files:
        print(render(path, args.top, args.match))


if __name__ == "__main__":
    main()
