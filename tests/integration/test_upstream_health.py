"""A broken upstream is visible in the log: once per route and kind, with its cause and,
for an https upstream that speaks plain HTTP, the fix; its recovery is logged too."""

from __future__ import annotations

from tests.support.curl import curl
from tests.support.ports import free_port
from tests.support.seed import SeededRegistry
from tests.support.waiting import eventually


def failing_lines(proxy) -> list[str]:
    return [m for m in proxy.log_messages() if "upstream of route" in m]


def test_a_refused_upstream_is_logged_once_with_its_cause(start_proxy) -> None:
    proxy = start_proxy(["--upstream", f"http://127.0.0.1:{free_port()}"])
    for _ in range(3):
        answer = curl(proxy.url + "/v2/app/manifests/v1")
        assert answer.status == 502
    eventually(lambda: failing_lines(proxy))
    lines = failing_lines(proxy)
    assert len([line for line in lines if "failing: connect" in line]) == 1, lines
    assert "connection refused" in lines[0]


def test_a_plain_http_upstream_given_without_a_scheme_gets_the_hint(
    start_proxy, prefixed_registry: SeededRegistry
) -> None:
    # No scheme means https; this registry speaks plain HTTP.
    proxy = start_proxy(["--upstream", prefixed_registry.host_port, "--repo-prefix", "proj"])
    assert curl(proxy.url + "/v2/app/manifests/v1").status == 502
    eventually(lambda: any("failing: tls" in line for line in failing_lines(proxy)))
    [line] = [line for line in failing_lines(proxy) if "failing: tls" in line]
    assert f"http://{prefixed_registry.host_port}" in line


def test_events_name_the_failure_kind(start_proxy) -> None:
    proxy = start_proxy(["--upstream", f"http://127.0.0.1:{free_port()}"])
    curl(proxy.url + "/v2/app/manifests/v1")
    proxy.stop()
    [event] = [
        e
        for e in proxy.log_events()
        if e.get("log_namespace") == "regproxy.access" and e.get("path") == "/v2/app/manifests/v1"
    ]
    assert event["error_kind"] == "connect"
