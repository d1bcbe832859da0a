"""Prometheus metrics and the per-request access event."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from twisted.logger import Logger

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS = (*_LATENCY_BUCKETS, 120, 300, 600, 1800)


@attrs.define
class Exchange:
    """What one request learnt on its way, for the access log and metrics."""

    upstream_status: int | None = None
    upstream_seconds: float | None = None
    route: str = ""
    endpoint: str = "other"
    error_kind: str | None = None
    # With --cache-dir: hit, miss, coalesced, stale or bypass.
    cache: str | None = None


class Metrics:
    """All of regproxy's metrics, in a registry of their own (no process-wide globals).

    ``exposed`` is the registry ``/metrics`` renders: this one, or with ``multiprocess``
    (a ``--workers`` worker; prometheus-client then keeps values in files under
    PROMETHEUS_MULTIPROC_DIR) one that sums every worker's files.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess: bool = False
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.exposed = self.registry
        if multiprocess:
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed)
        labels = ("route", "endpoint", "method", "status")
        self.requests = Counter(
            "regproxy_requests", "Requests answered.", labels, registry=self.registry
        )
        self.response_bytes = Counter(
            "regproxy_response_bytes",
            "Response body bytes sent to clients.",
            ("route", "endpoint"),
            registry=self.registry,
        )
        self.duration = Histogram(
            "regproxy_request_duration_seconds",
            "Time from request to the last byte of the answer.",
            ("route", "endpoint"),
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "regproxy_upstream_latency_seconds",
            "Time until the upstream's response headers arrived.",
            ("route", "endpoint"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "regproxy_in_flight_requests",
            "Requests being answered.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "regproxy_upstream_errors",
            "Upstream failures by kind (connect, timeout, tls, protocol, body, idle, ...).",
            ("route", "kind"),
            registry=self.registry,
        )
        self.token_fetches = Counter(
            "regproxy_token_fetches",
            "Tokens the proxy fetched with its own credentials, by outcome.",
            ("route", "outcome"),
            registry=self.registry,
        )
        self.authentications = Counter(
            "regproxy_authentications",
            "Authentications with [auth], by result: ok, failed, throttled, plain_http, "
            "invalid_token.",
            ("result",),
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "regproxy_rate_limited",
            "Manifest requests refused with 429 by [limits].",
            ("route",),
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, str, int], tuple[Any, Any, Any, Any]] = {}
        self._outcomes: dict[tuple[str, str], Any] = {}
        self.upstream_up = Gauge(
            "regproxy_upstream_up",
            "1 when the last check of the upstream's /v2/ got an HTTP answer, else 0.",
            ("route",),
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )
        self.cache_requests = Counter(
            "regproxy_cache_requests",
            "Blob and manifest requests by what the cache did: hit, miss, coalesced, stale, "
            "bypass.",
            ("route", "outcome"),
            registry=self.registry,
        )
        self.cache_events = Counter(
            "regproxy_cache_events",
            "What the cache store counts: bytes_from_cache, bytes_from_upstream, "
            "digest_mismatches, evictions, corrupt_objects, ... (by name).",
            ("name",),
            registry=self.registry,
        )
        self.cache_size = Gauge(
            "regproxy_cache",
            "The cache store: size_bytes and objects.",
            ("name",),
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )

    def authentication(self, result: str) -> None:
        self.authentications.labels(result).inc()

    def cache_outcome(self, route: str, outcome: str) -> None:
        # Labelled children looked up once: resolving labels costs more than counting.
        child = self._outcomes.get((route, outcome))
        if child is None:
            child = self._outcomes[(route, outcome)] = self.cache_requests.labels(route, outcome)
        child.inc()

    def observe_request(
        self,
        *,
        route: str,
        endpoint: str,
        method: str,
        status: int,
        sent: int,
        duration: float,
        upstream_seconds: float | None,
        upstream_error: str | None,
    ) -> None:
        """Record one finished request.

        The labelled children are looked up once per label set and kept: resolving them
        on every request is a measurable share of a small request's CPU.
        """
        key = (route, endpoint, method, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(route, endpoint, method, str(status)),
                self.response_bytes.labels(route, endpoint),
                self.duration.labels(route, endpoint),
                self.upstream_latency.labels(route, endpoint),
            )
        requests, response_bytes, durations, upstream_latency = children
        requests.inc()
        response_bytes.inc(sent)
        durations.observe(duration)
        if upstream_seconds is not None:
            upstream_latency.observe(upstream_seconds)
        if upstream_error is not None:
            self.upstream_errors.labels(route, upstream_error).inc()


def ip_of(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address ``address`` names, IPv4-mapped IPv6 as IPv4 (a dual-stack listener
    sees 127.0.0.1 as ::ffff:127.0.0.1); None when it names none."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ClientAddress:
    """The client's address: the peer's, or X-Forwarded-For's when the peer is trusted."""

    def __init__(self, trusted: Sequence[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(text, strict=False) for text in trusted)

    def is_trusted(self, address: str) -> bool:
        if not self.networks:
            return False
        ip = ip_of(address)
        return ip is not None and any(ip in network for network in self.networks)

    def resolve(self, peer: str, forwarded_for: Sequence[bytes] | None) -> str:
        """Walk X-Forwarded-For from the right while the hops are trusted proxies."""
        if not forwarded_for or not self.is_trusted(peer):
            return peer
        hops = [h.strip() for v in forwarded_for for h in v.decode("latin-1").split(",")]
        address = peer
        for hop in reversed(hops):
            if not hop:
                continue
            address = hop
            if not self.is_trusted(hop):
                break
        return address


access_log = Logger(namespace="regproxy.access")


class PrometheusCacheMetrics:
    """The cache store's counts (``regproxy.cache.metrics.CacheMetrics``) as metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._events: dict[str, Any] = {}

    def count(self, name: str, amount: int = 1) -> None:
        child = self._events.get(name)
        if child is None:
            child = self._events[name] = self._metrics.cache_events.labels(name)
        child.inc(amount)

    def gauge(self, name: str, value: int) -> None:
        self._metrics.cache_size.labels(name).set(value)
