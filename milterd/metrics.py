"""Prometheus metrics. Always counted (cheap); served only when ``metrics_listen`` is set.

With several worker processes, prometheus-client's multiprocess mode aggregates them: the
supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker imports this module.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["METRICS", "serve_metrics"]

VERDICT_WORDS = ("continue", "accept", "quarantine", "tempfail", "reject", "discard")
FAILURE_KINDS = ("exception", "timeout", "bad-return")
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
        self.decisions = Counter(
            "milterd_decisions",
            "Messages not simply passed, by final verdict and the plugin that decided it",
            ["plugin", "verdict"],
        )
        self.results = Counter(
            "milterd_results", "Authentication results recorded, by method and result",
            ["method", "result"],
        )  # fmt: skip
        # The supervisor's: configuration reloads and workers it had to restart.
        self.reloads = Counter(
            "milterd_reloads", "Configuration reloads (SIGHUP) by result", ["result"]
        )
        self.worker_exits = Counter(
            "milterd_worker_exits",
            "Workers that ended while the daemon ran, restarted: died (crash, signal) or "
            "stopped (exited 0 on its own)",
            ["how"],
        )
        self._by_verdict: dict[str, Counter] = {}
        self._children: dict[tuple[str, ...], Counter] = {}

    def declare_supervisor(self) -> None:
        """The supervisor's series at 0 (see :meth:`declare`)."""
        for result in ("accepted", "refused"):
            self.reloads.labels(result)
        for how in ("died", "stopped"):
            self.worker_exits.labels(how)

    def declare(self, plugins: list[tuple[str, list[str]]]) -> None:
        """Create the series a worker may count, at 0, so that ``rate()`` and alerts see
        0 rather than no data before the first failure: every verdict word, and each
        plugin's failures per hooked stage and kind. ``plugins``: (name, stages)."""
        for verdict in VERDICT_WORDS:
            self.messages.labels(verdict)
        for name, stages in plugins:
            self.abandoned.labels(name)
            for stage in stages:
                for kind in FAILURE_KINDS:
                    self.plugin_errors.labels(name, stage, kind)

    def decided(self, plugin: str, verdict: str) -> None:
        self._child(self.decisions, ("d", plugin, verdict), plugin, verdict).inc()

    def result(self, method: str, result: str) -> None:
        self._child(self.results, ("r", method, result), method, result).inc()

    def _child(self, metric: Counter, key: tuple[str, ...], *labels: str) -> Counter:
        child = self._children.get(key)
        if child is None:
            # Bounded: plugin names and RFC 8601 words, never message content.
            child = self._children[key] = metric.labels(*labels)
        return child

    def message(self, verdict: str) -> None:
        """Count one message: ``.labels()`` takes a lock and hashes on every call, so the
        child per verdict word (a handful) is looked up once."""
        child = self._by_verdict.get(verdict)
        if child is None:
            child = self._by_verdict[verdict] = self.messages.labels(verdict)
        child.inc()


METRICS = _Metrics()


def serve_metrics(listen: str) -> Any:
    """Serve /metrics on ``HOST:PORT`` in a background thread. Returns the server (its
    ``socket`` is the listening one, which a forked process closes)."""
    host, _, port = listen.rpartition(":")
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        server, _ = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    else:
        server, _ = start_http_server(int(port), addr=host.strip("[]"))
    return server
