"""Render a result (the dict ``suite.run`` returns, or its JSON) as text or reST tables.

``python -m bench.report RESULT.json [--rst]``
"""

from __future__ import annotations

import argparse
import json
import re
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


def _spread(values: list[float]) -> str:
    """(max - min) / median, in percent: how much one run's repeats disagree."""
    if len(values) < 2:
        return "-"
    ordered = sorted(values)
    median = ordered[len(ordered) // 2]
    return f"{100 * (ordered[-1] - ordered[0]) / median:.0f}%" if median else "-"


def _describe(key: str, run: dict[str, Any]) -> str:
    upstream = "TLS" if run.get("upstream_tls", key.startswith("tls")) else "plain"
    workers = run.get("workers", 1)
    text_ = f"upstream {upstream}, regproxy --workers {workers}"
    if "nginx_workers" in run:
        text_ += f", nginx worker_processes {run['nginx_workers']}"
    if run.get("listener_tls"):
        text_ += ", TLS listeners"
    return text_


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table of the report."""
    out: list[tuple[str, list[str], list[list[str]]]] = []
    for key, run in result["runs"].items():
        what = _describe(key, run)
        blob = run["blob"]
        rows = [
            [
                p,
                _f(blob[p]["median_mb_s"], 0),
                _spread(blob[p]["runs_mb_s"]),
                _f(blob[p].get("cpu_s_per_gib")),
                " ".join(f"{v:.0f}" for v in blob[p]["runs_mb_s"]),
            ]
            for p in PATHS
        ]
        cpu_ratio = _ratio(
            blob["regproxy"].get("cpu_s_per_gib"), blob["nginx"].get("cpu_s_per_gib")
        )
        rows.append(["regproxy/nginx", _f(blob["ratio_regproxy_nginx"]), "", _f(cpu_ratio), ""])
        out.append(
            (
                f"1. Blob GET, {_size(blob['blob_bytes'])}, {what}: MB/s (median)",
                ["path", "MB/s", "spread", "server CPU s/GiB", "runs"],
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
                        _spread(stats.get("rps_runs", [])),
                        _f(stats["p50_ms"]),
                        _f(stats["p99_ms"]),
                        _f(stats.get("cpu_ms_per_request"), 3),
                        f"{stats['errors'] + stats['non2xx']:.0f}",
                    ]
                )
            rows.append(
                [
                    connections,
                    "regproxy/nginx",
                    _f(row["ratio_regproxy_nginx"]),
                    "",
                    f"{_f(row.get('added_p50_ms_regproxy'))} added",
                    f"{_f(row['added_p99_ms_regproxy'])} added",
                    _f(row.get("cpu_ratio_regproxy_nginx")),
                    "",
                ]
            )
        out.append(
            (
                f"2. Manifest GET (wrk), {what}",
                [
                    "conns",
                    "path",
                    "req/s",
                    "spread",
                    "p50 ms",
                    "p99 ms",
                    "server CPU ms/req",
                    "errors",
                ],
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
                    f"3. Concurrent pulls of the small image, {what}",
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
                    f"4. regproxy RSS, all processes together (MiB), {what}",
                    ["load", "idle", "peak", "growth", "seconds", "errors"],
                    rows,
                )
            )
    for mode, calibration in result.get("calibration", {}).items():
        rows = []
        single = result["runs"].get(f"{mode}-w1", {}).get("manifest", {})
        for connections in sorted(
            {c for row in calibration["rows"].values() for c in row}, key=int
        ):
            reference = [
                (f"{p} (1 worker)", single[connections][p])
                for p in ("nginx", "regproxy")
                if connections in single
            ]
            measured = [
                (label, row[connections])
                for label, row in calibration["rows"].items()
                if connections in row
            ]
            for label, stats in [*measured, *reference]:
                rows.append(
                    [
                        connections,
                        label,
                        _f(stats["rps"], 0),
                        _spread(stats.get("rps_runs", [])),
                        _f(stats["p50_ms"]),
                        _f(stats["p99_ms"]),
                        _f(stats.get("cpu_ms_per_request"), 3),
                        f"{stats['errors'] + stats['non2xx']:.0f}",
                    ]
                )
        out.append(
            (
                f"5. Calibration: manifest GET ({calibration['manifest_bytes']} bytes) through "
                f"bare single-process servers, upstream {mode}",
                [
                    "conns",
                    "server",
                    "req/s",
                    "spread",
                    "p50 ms",
                    "p99 ms",
                    "server CPU ms/req",
                    "errors",
                ],
                rows,
            )
        )
    rows = [
        [t["target"], f"{t['op']} {t['limit']:g}", _f(t["value"]), "met" if t["met"] else "MISSED"]
        for t in result.get("targets", [])
    ]
    out.append(("Targets", ["target", "limit", "measured", ""], rows))
    return out


def header_lines(result: dict[str, Any]) -> list[str]:
    """The machine, the versions and how loaded the machine was by others."""
    lines = []
    machine = result.get("machine", {})
    lines.append("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    load = result.get("machine_load")
    if load:
        lines.append(
            f"run: {result.get('started', '?')}, {load['wall_s']:.0f} s; CPU taken by other "
            f"processes: {load['foreign_cpu_s']:.0f} s ({100 * load['foreign_cpu_share']:.1f}%)"
        )
    return lines


def text(result: dict[str, Any]) -> str:
    lines = header_lines(result)
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


BEGIN = ".. bench-results-begin"
END = ".. bench-results-end"


def write_docs(result: dict[str, Any], page: Path) -> None:
    """Put this run's tables into *page* between the BEGIN and END comment lines (added
    before the page's Analysis section, or at its end, the first time)."""
    settings = result.get("settings", {})
    block = [
        BEGIN,
        "",
        "Generated by ``python -m bench --write-docs``; figures are from one run on this "
        "machine, ratios in the same run matter, not absolute numbers.",
        "",
        "::",
        "",
        *(f"   {line}" for line in header_lines(result)),
        f"   settings: {json.dumps(settings, sort_keys=True)}",
        "",
        rst(result),
        END,
    ]
    text_ = page.read_text() if page.exists() else ""
    # The markers are whole lines: the page's prose may name them too.
    begin = re.search(rf"^{re.escape(BEGIN)}$", text_, re.MULTILINE)
    end = re.search(rf"^{re.escape(END)}$", text_, re.MULTILINE)
    if begin is not None and end is not None and begin.start() < end.start():
        text_ = text_[: begin.start()] + "\n".join(block) + text_[end.end() :]
    elif "\nAnalysis\n========" in text_:
        before, _, after = text_.partition("\nAnalysis\n========")
        text_ = before + "\n" + "\n".join(block) + "\n\n\nAnalysis\n========" + after
    else:
        text_ = text_ + "\n\nLatest run\n==========\n\n" + "\n".join(block) + "\n"
    page.write_text(text_)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("result", type=Path)
    parser.add_argument("--rst", action="store_true")
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    print(rst(result) if args.rst else text(result))


if __name__ == "__main__":
    main()
