"""Prometheus metrics: per task what vLLM cannot tell (it sees adapter names, not tasks), and per backend.

(Not the records' evaluation `metrics`: these count requests, tokens and latency.)
One `CollectorRegistry` per app (no process-global collectors), so two
routers in one test process do not collide. Backend metrics are read from the
pool at scrape time and labelled by backend URL only, so their label set stays
as small as the pool however many adapters are served. What the live route table
serves is read at scrape time too: each serving version's share of its task's
requests (the canary split as set) and the count of versions that went live
(hot-adds: a new task, a new version, a canary, a rollback).
deploy/observability/ holds a Grafana dashboard over these series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .live import LiveTable

UNROUTED = "-"


class RequestMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        labels = ["task", "adapter"]
        self.requests = Counter("mtft_requests", "Requests answered, by task, adapter, route and status",
                                [*labels, "route", "status"], registry=self.registry)
        self.errors = Counter("mtft_errors", "Requests that failed, by error code",
                              [*labels, "code"], registry=self.registry)
        self.tokens = Counter("mtft_tokens", "Prompt and completion tokens, from vLLM's usage",
                              [*labels, "kind"], registry=self.registry)
        self.latency = Histogram("mtft_request_seconds", "Time to the last byte of the answer", labels,
                                 registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.learned = Histogram("mtft_learned_score", "Learned-routing score of requests that named no task, "
                                 "by the route they took (learned: at or above the threshold; default: below)",
                                 ["route"], registry=self.registry,
                                 buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5))

        # Each label set's series, looked up once: `labels()` takes a lock and builds its key every call.
        self._answered: dict[tuple[str, str, str, int], tuple[Counter, Histogram]] = {}
        self._tokens: dict[tuple[str, str], tuple[Counter, Counter]] = {}

    def observe(self, task: str, adapter: str, route: str, status: int, seconds: float,
                usage: dict | None, code: str | None = None) -> None:
        key = (task, adapter, route, status)
        if key not in self._answered:
            self._answered[key] = (self.requests.labels(task, adapter, route, str(status)),
                                   self.latency.labels(task, adapter))
        requests, latency = self._answered[key]
        requests.inc()
        latency.observe(seconds)
        if code is not None:
            self.errors.labels(task, adapter, code).inc()
        if usage:
            if (task, adapter) not in self._tokens:
                self._tokens[task, adapter] = (self.tokens.labels(task, adapter, "prompt"),
                                               self.tokens.labels(task, adapter, "completion"))
            prompt, completion = self._tokens[task, adapter]
            prompt.inc(usage.get("prompt_tokens") or 0)
            completion.inc(usage.get("completion_tokens") or 0)

    def observe_learned(self, route: str, score: float | None) -> None:
        """Label cardinality stays at two: the route is 'learned' or 'default'."""
        if score is not None:
            self.learned.labels(route).observe(score)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BackendMetrics:
    """A collector: each backend's health, requests in flight and served, adapters loaded and slots; each
    serving version's share of its task and the versions that went live."""

    def __init__(self, live: LiveTable):
        self.live, self.pool = live, live.pool

    def collect(self) -> Iterator[Metric]:
        yield from self._backends()
        share = GaugeMetricFamily("mtft_route_percent", "Percent of a task's requests its version is set to answer "
                                  "(100 without a canary)", labels=["task", "adapter"])
        table = self.live.table
        for task, record in table.current.items():
            canary = table.canaries.get(task)
            share.add_metric([task, record.name], 100.0 - (canary.percent if canary else 0.0))
            if canary:
                share.add_metric([task, canary.record.name], canary.percent)
        yield share
        added = CounterMetricFamily("mtft_adapters_added", "Times a version went live (started answering as its "
                                    "task's version or canary), at start and hot-added", labels=["task", "adapter"])
        for (task, name), count in sorted(self.live.went_live.items()):
            added.add_metric([task, name], count)
        yield added

    def _backends(self) -> Iterator[Metric]:
        gauges = {
            "healthy": GaugeMetricFamily("mtft_backend_healthy", "1 while the backend is in rotation", labels=["backend"]),
            "inflight": GaugeMetricFamily("mtft_backend_inflight", "Requests in flight there", labels=["backend"]),
            "adapters": GaugeMetricFamily("mtft_backend_adapters", "Adapters the router has loaded there",
                                          labels=["backend"]),
            "slots": GaugeMetricFamily("mtft_backend_slots", "Adapters the router keeps there at most",
                                       labels=["backend"]),
        }
        served = CounterMetricFamily("mtft_backend_requests", "Requests placed there", labels=["backend"])
        for b in self.pool.backends:
            for name, value in (("healthy", b.healthy), ("inflight", b.inflight), ("adapters", len(b.loaded)),
                                ("slots", b.slots)):
                gauges[name].add_metric([b.url], float(value))
            served.add_metric([b.url], b.served)
        yield from gauges.values()
        yield served
        yield CounterMetricFamily("mtft_retries", "Requests sent again to another backend after one failed them",
                                  value=self.pool.retried)
