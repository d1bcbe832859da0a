"""``python -m bench``: run the regproxy benchmark suite and print the table.

Run from the repository root (it uses the fixtures in tests/support) with the project's
virtualenv. Needs docker-registry, skopeo, nginx (nginx-light), wrk and curl.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from .report import text, write_docs
from .suite import GiB, MiB, Settings, run


def size(text_: str) -> int:
    units = {"k": 1 << 10, "m": MiB, "g": GiB}
    text_ = text_.strip().lower().removesuffix("ib").removesuffix("b")
    if text_ and text_[-1] in units:
        return int(float(text_[:-1]) * units[text_[-1]])
    return int(text_)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny blob, 1 s wrk runs, 10 pulls, 5 streams (the test suite's run)",
    )
    parser.add_argument("--blob-size", type=size, help="big blob size, e.g. 1GiB (default)")
    parser.add_argument("--repeats", type=int, help="blob GETs per path (median; default 5)")
    parser.add_argument("--durations", type=float, help="seconds per wrk run (default 5)")
    parser.add_argument("--pulls", type=int, help="concurrent pulls (default 100)")
    parser.add_argument("--streams", type=int, help="concurrent blob streams (default 100)")
    parser.add_argument(
        "--stream-blob-size", type=size, help="blob of the concurrent streams (default 64MiB)"
    )
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run items 1, 2 and 5 against an HTTPS upstream (default on)",
    )
    parser.add_argument(
        "--workers",
        type=lambda text: tuple(int(n) for n in text.split(",")),
        help="regproxy --workers of each run, comma-separated (default 2,1)",
    )
    parser.add_argument(
        "--nginx-workers",
        type=int,
        help="nginx worker_processes (default: regproxy's worker count of each run)",
    )
    parser.add_argument(
        "--tls-listeners",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="in the TLS run, clients speak HTTPS to both proxies (default on)",
    )
    parser.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure bare twisted.web, Agent and treq servers too (default on)",
    )
    parser.add_argument(
        "--rate-repeats", type=int, help="wrk runs per path and concurrency (default 3)"
    )
    parser.add_argument(
        "--write-docs",
        metavar="RST",
        nargs="?",
        const=Path("docs/benchmarks.rst"),
        type=Path,
        help="put the tables into this page (default docs/benchmarks.rst) between its "
        "'.. bench-results-begin' and '.. bench-results-end' lines",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="after measuring, record py-spy profiles of regproxy into DIR",
    )
    parser.add_argument("--json", metavar="OUT", type=Path, help="write the result as JSON")
    args = parser.parse_args(argv)

    overrides = {
        key: value
        for key, value in {
            "blob_size": args.blob_size,
            "repeats": args.repeats,
            "duration": args.durations,
            "pulls": args.pulls,
            "streams": args.streams,
            "stream_blob_size": args.stream_blob_size,
            "tls": args.tls,
            "nginx_workers": args.nginx_workers,
            "workers": args.workers,
            "tls_listeners": args.tls_listeners,
            "calibrate": args.calibrate,
            "rate_repeats": args.rate_repeats,
            "profile_dir": args.profile,
        }.items()
        if value is not None
    }
    settings = Settings.smoke_settings(**overrides) if args.smoke else Settings(**overrides)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds, so every process gets stopped

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)

    def log(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    result = run(settings, log)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.write_docs:
        write_docs(result, args.write_docs)
    print(text(result))
    return 0 if all(t["met"] for t in result["targets"]) or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
