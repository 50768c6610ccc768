"""Per-task Prometheus request metrics: what vLLM cannot tell, since it sees adapter names, not tasks.

(Not the records' evaluation `metrics`: these count requests, tokens and latency.)
One `CollectorRegistry` per app (no process-global collectors), so two
routers in one test process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

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

    def observe(self, task: str, adapter: str, route: str, status: int, seconds: float,
                usage: dict | None, code: str | None = None) -> None:
        self.requests.labels(task, adapter, route, str(status)).inc()
        self.latency.labels(task, adapter).observe(seconds)
        if code is not None:
            self.errors.labels(task, adapter, code).inc()
        if usage:
            self.tokens.labels(task, adapter, "prompt").inc(usage.get("prompt_tokens") or 0)
            self.tokens.labels(task, adapter, "completion").inc(usage.get("completion_tokens") or 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
