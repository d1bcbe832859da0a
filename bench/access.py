"""What access control costs a manifest GET: CPU per request with a verified Bearer token
([auth], ``--htpasswd``) against the same proxy without [auth].

``python -m bench.access [--seconds 3] [--repeats 5]``

Both proxies serve the small image's manifest by digest from a cache (``--cache-dir``), so
the figure compared is the cheapest request there is and the added cost shows most. Runs
alternate (A B A B ...) and the medians are reported, as in ``bench.cpu``; a second figure
times the admission check alone, in this process (``admit`` with a remembered token).
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import statistics
import tempfile
import timeit
import urllib.request
from pathlib import Path

from tests.support.proxy import RegproxyProcess
from tests.support.registry import RegistryServer, write_htpasswd

from . import load
from .seed import push_small_image

PREFIX = "bench"
PASSWORD = "bench-password"


def token(proxy: RegproxyProcess) -> str:
    request = urllib.request.Request(
        f"{proxy.url}/_token?service={proxy.host_port}&scope=repository:small:pull",
        headers={
            "Authorization": "Basic " + base64.b64encode(f"bench:{PASSWORD}".encode()).decode()
        },
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return str(json.loads(answer.read())["token"])


def admission_microseconds(count: int = 20000) -> float:
    """One ``admit`` of a remembered token (signature verified once), in microseconds."""
    from regproxy.access.admission import admit
    from regproxy.access.gate import Client, Gates
    from regproxy.access.tokens import access_claims
    from regproxy.config import AuthConfig, Route, Upstream
    from regproxy.routing.matching import RouteTable

    route = Route(Upstream("https", "upstream.example"))
    gates = Gates(clock=lambda: 1000.0, run_blocking=None, issuers_for=lambda configs: {})  # type: ignore[arg-type]
    gate = gates(RouteTable((route,), auth=AuthConfig(users={"bench": b"x"})))
    assert gate is not None
    claims = access_claims(
        subject="bench", audience="r", repositories=["small"], now=1000, ttl=300
    )
    header = b"Bearer " + gate.key.sign(claims).encode()
    client = Client("127.0.0.1", True)

    def once() -> None:
        admit(
            gate,
            route=route,
            name="small",
            client_name="small",
            authorization=header,
            client=client,
            realm="http://r/_token",
            service="r",
        )

    once()
    return 1e6 * timeit.timeit(once, number=count) / count


def _measure(work: Path, seconds: float, repeats: int) -> dict[str, list[float]]:
    """CPU ms per manifest GET of each row, *repeats* alternating runs of *seconds*."""
    write_htpasswd(work / "users", {"bench": PASSWORD})
    with RegistryServer(directory=work / "registry") as registry:
        small = push_small_image(registry.url, work / "layout", f"{PREFIX}/small", "latest")
        common = ["--upstream", registry.url, "--repo-prefix", PREFIX]
        plain = RegproxyProcess(
            [*common, "--cache-dir", str(work / "cache-a")], directory=work / "a"
        )
        closed = RegproxyProcess(
            [*common, "--cache-dir", str(work / "cache-b"), "--htpasswd", str(work / "users")],
            directory=work / "b",
        )
        with plain, closed:
            bearer = [f"Authorization: Bearer {token(closed)}"]
            rows = {"without [auth]": (plain, []), "Bearer verified": (closed, bearer)}
            figures: dict[str, list[float]] = {label: [] for label in rows}
            for proxy, headers in rows.values():  # warm: the digest in the cache
                load.run_wrk(
                    f"{proxy.url}/v2/small/manifests/{small.digest}", 4, 1, headers=headers
                )
            for _ in range(repeats):
                for label, (proxy, headers) in rows.items():
                    before = load.process_cpu_seconds(proxy.pid)
                    url = f"{proxy.url}/v2/small/manifests/{small.digest}"
                    result = load.run_wrk(url, 16, seconds, headers=headers)
                    cpu = load.process_cpu_seconds(proxy.pid) - before
                    if result["errors"] or result["non2xx"]:
                        raise RuntimeError(f"{label}: errors under load {result}")
                    figures[label].append(1000 * cpu / result["requests"])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="regproxy-bench-access-"))
    try:
        figures = _measure(work, options.seconds, options.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {label: statistics.median(values) for label, values in figures.items()}
    for label, value in medians.items():
        print(f"{label:16} {value:.4f} ms CPU per manifest GET (runs: {figures[label]})")
    added = medians["Bearer verified"] - medians["without [auth]"]
    print(f"added by access control: {added:.4f} ms per manifest GET")
    print(f"admission check alone (remembered token): {admission_microseconds():.1f} us")


if __name__ == "__main__":
    main()
