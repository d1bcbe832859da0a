"""Render a result (the dict ``suite.run`` returns, or its JSON) as text or reST tables.

``python -m bench.report RESULT.json [--rst]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PATHS = ("direct", "nginx", "regproxy")


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _size(count: float) -> str:
    if count >= 1 << 30 and count % (1 << 30) == 0:
        return f"{count / (1 << 30):.0f} GiB"
    if count >= 1 << 20:
        return f"{count / (1 << 20):.0f} MiB"
    return f"{count / 1024:.0f} KiB"


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table of the report."""
    out: list[tuple[str, list[str], list[list[str]]]] = []
    for mode, run in result["runs"].items():
        blob = run["blob"]
        rows = [
            [
                p,
                _f(blob[p]["median_mb_s"], 0),
                _f(blob[p].get("cpu_s_per_gib")),
                " ".join(f"{v:.0f}" for v in blob[p]["runs_mb_s"]),
            ]
            for p in PATHS
        ]
        rows.append(["regproxy/nginx", _f(blob["ratio_regproxy_nginx"]), "", ""])
        out.append(
            (
                f"1. Blob GET, {_size(blob['blob_bytes'])}, upstream {mode}: MB/s (median)",
                ["path", "MB/s", "server CPU s/GiB", "runs"],
                rows,
            )
        )
        rows = []
        for connections, row in run["manifest"].items():
            for p in PATHS:
                stats = row[p]
                rows.append(
                    [
                        connections,
                        p,
                        _f(stats["rps"], 0),
                        _f(stats["p50_ms"]),
                        _f(stats["p99_ms"]),
                        _f(stats.get("cpu_ms_per_request")),
                        f"{stats['errors'] + stats['non2xx']:.0f}",
                    ]
                )
            rows.append(
                [
                    connections,
                    "regproxy/nginx",
                    _f(row["ratio_regproxy_nginx"]),
                    f"{_f(row.get('added_p50_ms_regproxy'))} added",
                    f"{_f(row['added_p99_ms_regproxy'])} added",
                    "",
                    "",
                ]
            )
        out.append(
            (
                f"2. Manifest GET (wrk), upstream {mode}",
                ["conns", "path", "req/s", "p50 ms", "p99 ms", "server CPU ms/req", "errors"],
                rows,
            )
        )
        if "pulls" in run:
            rows = [
                [
                    p,
                    str(run["pulls"][p]["pulls"]),
                    _f(run["pulls"][p]["wall_s"]),
                    _f(run["pulls"][p]["pull_p50_s"], 3),
                    _f(run["pulls"][p]["pull_max_s"], 3),
                    str(run["pulls"][p]["errors"]),
                ]
                for p in PATHS
            ]
            out.append(
                (
                    f"3. Concurrent pulls of the small image, upstream {mode}",
                    ["path", "pulls", "wall s", "pull p50 s", "pull max s", "errors"],
                    rows,
                )
            )
        if "memory" in run:
            memory = run["memory"]
            slow, many = memory["slow_stream"], memory["concurrent_streams"]
            rows = [
                [
                    f"1 stream of {_size(slow['blob_bytes'])} at "
                    f"{slow['rate_bytes_s'] / 1e6:.0f} MB/s",
                    _f(slow["idle_rss_mib"], 1),
                    _f(slow["peak_rss_mib"], 1),
                    _f(slow["growth_mib"], 1),
                    f"{slow['seconds']:.0f}",
                    str(slow["errors"]),
                ],
                [
                    f"{many['streams']} streams of {_size(many['blob_bytes'])} at "
                    f"{many['rate_bytes_s'] / 1e6:.0f} MB/s each",
                    _f(many["idle_rss_mib"], 1),
                    _f(many["peak_rss_mib"], 1),
                    _f(many["growth_mib"], 1),
                    f"{many['seconds']:.0f}",
                    str(many["errors"]),
                ],
            ]
            out.append(
                (
                    "4. regproxy RSS (MiB)",
                    ["load", "idle", "peak", "growth", "seconds", "errors"],
                    rows,
                )
            )
    rows = [
        [t["target"], f"{t['op']} {t['limit']:g}", _f(t["value"]), "met" if t["met"] else "MISSED"]
        for t in result.get("targets", [])
    ]
    out.append(("Targets", ["target", "limit", "measured", ""], rows))
    return out


def text(result: dict[str, Any]) -> str:
    lines = []
    machine = result.get("machine", {})
    lines.append("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    load = result.get("machine_load")
    if load:
        lines.append(
            f"run: {load['wall_s']:.0f} s; CPU taken by other processes: "
            f"{load['foreign_cpu_s']:.0f} s ({100 * load['foreign_cpu_share']:.1f}%)"
        )
    for title, header, rows in tables(result):
        widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]
        lines.append("")
        lines.append(title)
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)))
        lines.append("  ".join("-" * w for w in widths))
        lines.extend(
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) for row in rows
        )
    return "\n".join(lines)


def rst(result: dict[str, Any]) -> str:
    blocks = []
    for title, header, rows in tables(result):
        widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]
        widths = [max(w, 1) for w in widths]
        rule = "  ".join("=" * w for w in widths)
        body = [rule, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)), rule]
        body += [
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) for row in rows
        ]
        body.append(rule)
        blocks.append(f"**{title}**\n\n" + "\n".join(line.rstrip() for line in body))
    return "\n\n".join(blocks) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("result", type=Path)
    parser.add_argument("--rst", action="store_true")
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    print(rst(result) if args.rst else text(result))


if __name__ == "__main__":
    main()
