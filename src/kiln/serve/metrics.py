"""Prometheus metrics and Triton-style statistics, recorded at each arrow of a request's path.

Durations are **histograms**, so P99 aggregates correctly across replicas (a summary's quantiles do not).
Every series carries ``model`` and ``version`` labels. One ``ServerMetrics`` owns its own registry, so two
servers in one process (tests) do not collide. A version's series go when it is unloaded, as Triton's do; a
later load of it starts them from zero.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
_LABELS = ("model", "version")


class ServerMetrics:
    """The registry and metric families of one server; ``for_model`` binds the labels of one version."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_seconds = Histogram(
            "kiln_request_duration_seconds",
            "Time from a request's arrival to its response, by outcome.",
            [*_LABELS, "outcome"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "kiln_queue_duration_seconds",
            "Time a request waited in its model's queue.",
            _LABELS,
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "kiln_compute_duration_seconds",
            "Time one batch spent in the engine.",
            _LABELS,
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_rows = Histogram(
            "kiln_batch_size_rows", "Rows per executed batch.", _LABELS, buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_rows = Gauge("kiln_queue_depth_rows", "Rows waiting in the model's queue.", _LABELS, registry=r)
        self.inflight = Gauge("kiln_inflight_requests", "Requests received and not yet answered.", _LABELS, registry=r)
        self.requests = Counter("kiln_requests", "Requests answered, by outcome.", [*_LABELS, "outcome"], registry=r)
        self.failures = Counter(
            "kiln_request_failures", "Requests that failed, by reason.", [*_LABELS, "reason"], registry=r
        )
        self._models: dict[tuple[str, str], ModelMetrics] = {}
        self._lock = threading.Lock()

    def for_model(self, name: str, version: int | str) -> ModelMetrics:
        key = (name, str(version))
        with self._lock:
            if key not in self._models:
                self._models[key] = ModelMetrics(self, *key)
            return self._models[key]

    def forget(self, name: str, version: int | str) -> None:
        """Drop the series of a version that is no longer served (unloaded, or out of the latest-N policy).

        NOTE: call it when the version leaves the served set, before a load can bind the same labels again: its
        draining requests then update unregistered children, not the series of the version loaded next.
        """
        with self._lock:
            metrics = self._models.pop((name, str(version)), None)
        if metrics is not None:
            metrics.unregister()

    def render(self) -> bytes:
        """The Prometheus text exposition format."""
        return generate_latest(self.registry)


@dataclass
class ModelStats:
    """Triton's statistics extension counters for one model version (durations in nanoseconds)."""

    inference_count: int = 0  # rows
    execution_count: int = 0  # batches
    last_inference_ms: int = 0
    success: list[int] = field(default_factory=lambda: [0, 0])  # count, ns
    fail: list[int] = field(default_factory=lambda: [0, 0])
    queue: list[int] = field(default_factory=lambda: [0, 0])
    compute_infer: list[int] = field(default_factory=lambda: [0, 0])
    batch_sizes: dict[int, list[int]] = field(default_factory=dict)  # rows -> [count, compute ns]


class ModelMetrics:
    """Metrics of one model version, with the label children bound once (``labels()`` is not free)."""

    def __init__(self, server: ServerMetrics, model: str, version: str) -> None:
        self._server = server
        self._labels = (model, version)
        self._queue_seconds = server.queue_seconds.labels(model, version)
        self._compute_seconds = server.compute_seconds.labels(model, version)
        self._batch_rows = server.batch_rows.labels(model, version)
        self._queue_rows = server.queue_rows.labels(model, version)
        self.inflight = server.inflight.labels(model, version)
        # Bound once: finished() runs for every request.
        self._request_seconds = {o: server.request_seconds.labels(model, version, o) for o in ("success", "failure")}
        self._requests = {o: server.requests.labels(model, version, o) for o in ("success", "failure")}
        self._reasons: set[str] = set()  # failure reasons seen, whose series ``unregister`` removes
        self._registered = True
        self.stats = ModelStats()
        self._lock = threading.Lock()

    def queued(self, seconds: float) -> None:
        self._queue_seconds.observe(seconds)
        self.stats.queue[0] += 1
        self.stats.queue[1] += int(seconds * 1e9)

    def batch(self, rows: int, seconds: float, requests: int = 1) -> None:
        """A batch of ``requests`` requests and ``rows`` rows ran in ``seconds``. Called from worker threads.

        Triton's ``compute_infer`` counts requests, each with the batch's duration (so its count matches
        ``success``); ``execution_count`` and the batch-size statistics count batches.
        """
        self._compute_seconds.observe(seconds)
        self._batch_rows.observe(rows)
        ns = int(seconds * 1e9)
        with self._lock:
            stats = self.stats
            stats.execution_count += 1
            stats.inference_count += rows
            stats.compute_infer[0] += requests
            stats.compute_infer[1] += ns * requests
            entry = stats.batch_sizes.setdefault(rows, [0, 0])
            entry[0] += 1
            entry[1] += ns

    def queue_depth(self, rows: int) -> None:
        self._queue_rows.set(rows)

    def finished(self, seconds: float, outcome: str, reason: str | None = None) -> None:
        """A request answered: ``outcome`` is ``success`` or ``failure`` (then ``reason`` says why)."""
        self._request_seconds[outcome].observe(seconds)
        self._requests[outcome].inc()
        ns = int(seconds * 1e9)
        bucket = self.stats.success if outcome == "success" else self.stats.fail
        bucket[0] += 1
        bucket[1] += ns
        if outcome == "success":
            self.stats.last_inference_ms = int(time.time() * 1000)
        elif reason is not None and self._registered:  # a request that outlived its version's series adds none
            self._reasons.add(reason)
            self._server.failures.labels(*self._labels, reason).inc()

    def unregister(self) -> None:
        """Remove this version's series from the registry (``ServerMetrics.forget``)."""
        self._registered = False
        server, labels = self._server, self._labels
        for family in (server.queue_seconds, server.compute_seconds, server.batch_rows, server.queue_rows):
            family.remove(*labels)
        server.inflight.remove(*labels)  # a separate line: mypy's join of the five families is not one type
        for outcome in ("success", "failure"):
            server.request_seconds.remove(*labels, outcome)
            server.requests.remove(*labels, outcome)
        for reason in self._reasons:
            server.failures.remove(*labels, reason)

    def triton_stats(self) -> dict[str, Any]:
        """This version's entry of ``GET /v2/models/{m}/stats`` (Triton's statistics extension)."""
        s = self.stats

        def duration(pair: list[int]) -> dict[str, int]:
            return {"count": pair[0], "ns": pair[1]}

        return {
            "name": self._labels[0],
            "version": self._labels[1],
            "last_inference": s.last_inference_ms,
            "inference_count": s.inference_count,
            "execution_count": s.execution_count,
            "inference_stats": {
                "success": duration(s.success),
                "fail": duration(s.fail),
                "queue": duration(s.queue),
                "compute_input": duration([0, 0]),
                "compute_infer": duration(s.compute_infer),
                "compute_output": duration([0, 0]),
                "cache_hit": duration([0, 0]),
                "cache_miss": duration([0, 0]),
            },
            "batch_stats": [
                {
                    "batch_size": rows,
                    "compute_input": duration([0, 0]),
                    "compute_infer": duration(pair),
                    "compute_output": duration([0, 0]),
                }
                for rows, pair in sorted(s.batch_sizes.items())
            ],
        }
