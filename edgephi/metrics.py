"""Prometheus metrics (prometheus_client), served over HTTP when ``EDGEPHI_METRICS_PORT`` is set.

Names follow Prometheus conventions (base units: seconds, ``_total`` for counters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgephi.security import AUTH_FAILURE_REASONS

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
_TPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)


class Metrics:
    """All of the daemon's metrics in one registry (one instance per server)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edgephi_requests", "Finished RPCs by method and gRPC code.", ["method", "code"], registry=r
        )
        self.ttft = Histogram(
            "edgephi_time_to_first_token_seconds",
            "TTFT: request received → first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "edgephi_time_per_output_token_seconds",
            "TPOT: (last token − first token) / (completion tokens − 1).",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("edgephi_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter("edgephi_completion_tokens", "Tokens generated.", registry=r)
        self.guard_trips = Counter("edgephi_guard_trips", "Memory-guard trips by level.", ["level"], registry=r)
        self.watchdog_misses = Counter("edgephi_watchdog_misses", "Watchdog ticks without a ping.", registry=r)
        self.auth_failures = Counter(
            "edgephi_auth_failures",
            "Refused authentications by reason: missing, invalid, or duplicate (more than one authorization header).",
            ["reason"],
            registry=r,
        )
        for reason in AUTH_FAILURE_REASONS:  # exported at 0 from the start, so that rate() and alerts work
            self.auth_failures.labels(reason)
        self.engine_restarts = Gauge(
            "edgephi_engine_restarts", "Service restarts before this start (systemd NRestarts, if given).", registry=r
        )

    def add_engine_gauges(self, read: Callable[[], dict[str, float]]) -> None:
        """Expose gauges read at scrape time (running/queued streams, engine requests, KV-cache use)."""
        self.registry.register(_CallbackCollector(read))


class _CallbackCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, value in self._read().items():
            yield GaugeMetricFamily(f"edgephi_{name}", name.replace("_", " "), value=value)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
