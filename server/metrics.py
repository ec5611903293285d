"""Prometheus metrics, all prefixed `loraplex_`, in a registry of their own per process.

A server is several processes (HTTP workers and the engine process). `loraplex serve` points
PROMETHEUS_MULTIPROC_DIR at a folder of its own before any of them starts, so every process's counters
and histograms are files there, and a worker's /metrics reads them all (`render`): one view of the whole
server, whichever worker answers. What only the engine process knows at scrape time (queue depth, slots,
host cache) comes from its `stats` answer (`render(stats)`).
"""

from __future__ import annotations

import os
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OTHER_ADAPTERS = "other"
# The `method` label of the request metric: a client may send any token as the method, so anything else
# counts as "other" and the label set stays bounded.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})
OTHER_METHODS = "other"


def method_label(method: str) -> str:
    """`method` if it is a standard HTTP method, else "other"."""
    return method if method in HTTP_METHODS else OTHER_METHODS


class Metrics:
    """The serving metrics. Safe to update from the event loop and the engine worker thread."""

    def __init__(self, max_adapter_labels: int = 64):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraplex_requests", "HTTP requests by route template, method (unknown: 'other') and status.",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "loraplex_request_duration_seconds", "Time from request start to response, by route.",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "loraplex_queue_duration_seconds", "Time an input waits in the queue before its batch starts.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokenize_seconds = Histogram(
            "loraplex_tokenization_duration_seconds", "Time to tokenize the inputs of one request.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "loraplex_inference_duration_seconds", "Time of one batch: slot loads and the forward pass.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "loraplex_batch_size", "Rows (inputs) in one forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r,
        )  # fmt: skip
        self.batch_tokens = Histogram(
            "loraplex_batch_tokens", "Tokens in one forward pass, counted as padded length x rows.",
            buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536), registry=r,
        )  # fmt: skip
        self.batch_adapters = Histogram(
            "loraplex_batch_adapters", "Distinct adapters in one forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "loraplex_requests_in_flight", "Requests on work routes not yet answered.", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.inputs = Counter(
            "loraplex_inputs", "Inputs classified, by adapter (past the label limit: 'other').",
            ["adapter"], registry=r,
        )  # fmt: skip
        self.dropped = Counter(
            "loraplex_dropped_inputs",
            "Queued inputs dropped before inference: client disconnected, request timed out, shutdown.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.adapter_load_seconds = Histogram(
            "loraplex_adapter_load_duration_seconds",
            "Time to load an adapter, by tier: 'store' (read and check) or 'slot' (write into the engine).",
            ["tier"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._max_adapter_labels = max_adapter_labels
        self._adapter_labels: set[str] = set()
        self._lock = threading.Lock()
        self._children: dict[tuple[int, tuple[str, ...]], object] = {}

    def child(self, metric, *labels: str):
        """`metric.labels(*labels)`, kept once made (the client library checks and looks the labels up
        again on every call). Every label set here is bounded, so the cache is too."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def adapter_label(self, adapter_id: str) -> str:
        """The first `max_adapter_labels` adapters seen get their own label, so cardinality stays bounded."""
        with self._lock:
            if adapter_id in self._adapter_labels:
                return adapter_id
            if len(self._adapter_labels) < self._max_adapter_labels:
                self._adapter_labels.add(adapter_id)
                return adapter_id
        return OTHER_ADAPTERS

    def watch_registry(self, registry) -> None:
        """Report the adapter registry's load times as they happen (engine process)."""
        registry.load_listeners.append(
            lambda tier, seconds: self.adapter_load_seconds.labels(tier).observe(seconds)
        )

    def render(self, stats: dict | None = None) -> bytes:
        """Every process's metrics (this one's alone outside a multi-process server), and `stats`, the
        engine process's gauges and counters at this moment."""
        if os.environ.get(MULTIPROCESS_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        if stats is None:
            return generate_latest(registry)
        collector = _EngineCollector(stats)
        registry.register(collector)
        try:
            return generate_latest(registry)
        finally:
            registry.unregister(collector)


class _EngineCollector:
    """The engine process's queue and registry counters (its `stats` answer), for one scrape."""

    def __init__(self, stats: dict):
        self._stats = stats

    def describe(self):
        return []

    def collect(self):
        s = self._stats
        yield GaugeMetricFamily("loraplex_queue_depth", "Inputs waiting for the engine.", s["queue_depth"])
        yield GaugeMetricFamily(
            "loraplex_resident_adapters", "Adapters resident in engine slots.", s["resident"]
        )
        yield GaugeMetricFamily(
            "loraplex_host_cached_adapters", "Adapters parsed in host memory.", s["host_cached"]
        )
        yield CounterMetricFamily(
            "loraplex_slot_hits", "Batch adapters already resident in a slot.", s["hits"]
        )
        yield CounterMetricFamily("loraplex_slot_misses", "Batch adapters written into a slot.", s["misses"])
        yield CounterMetricFamily(
            "loraplex_slot_evictions", "Slot writes that displaced an adapter.", s["evictions"]
        )
        yield CounterMetricFamily("loraplex_store_loads", "Adapters read from the store.", s["store_loads"])
        yield CounterMetricFamily(
            "loraplex_store_damaged", "Damaged or foreign store entries skipped or refused.", s["damaged"]
        )
        yield CounterMetricFamily(
            "loraplex_host_evictions", "Adapters dropped from the host cache.", s["host_evictions"]
        )
