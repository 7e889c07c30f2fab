"""Prometheus metrics. Always counted (cheap); served only when ``metrics_listen`` is set.

With several worker processes, prometheus-client's multiprocess mode aggregates them: the
supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker imports this module.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["METRICS", "serve_metrics"]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _Metrics:
    def __init__(self) -> None:
        self.messages = Counter("milterd_messages", "Messages by final verdict", ["verdict"])
        self.plugin_seconds = Histogram(
            "milterd_plugin_seconds",
            "Time spent in plugin hooks",
            ["plugin", "stage"],
            buckets=_BUCKETS,
        )
        self.plugin_errors = Counter(
            "milterd_plugin_errors",
            "Plugin failures (exception, timeout, bad-return)",
            ["plugin", "stage", "kind"],
        )
        self.abandoned = Counter(
            "milterd_plugin_abandoned_calls",
            "Calls still running after their deadline (their thread is held)",
            ["plugin"],
        )
        self.connections = Gauge(
            "milterd_connections_open", "Open MTA connections", multiprocess_mode="livesum"
        )
        self._by_verdict: dict[str, Counter] = {}

    def message(self, verdict: str) -> None:
        """Count one message: ``.labels()`` takes a lock and hashes on every call, so the
        child per verdict word (a handful) is looked up once."""
        child = self._by_verdict.get(verdict)
        if child is None:
            child = self._by_verdict[verdict] = self.messages.labels(verdict)
        child.inc()


METRICS = _Metrics()


def serve_metrics(listen: str) -> None:
    """Serve /metrics on ``HOST:PORT`` in a background thread."""
    host, _, port = listen.rpartition(":")
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    else:
        start_http_server(int(port), addr=host.strip("[]"))
