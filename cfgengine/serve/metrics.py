"""The server's Prometheus metrics (text exposition format 0.0.4), kept by hand: a few gauges,
counters and one latency histogram need no client library."""
from __future__ import annotations

import bisect
import collections
import threading

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """Queue depth, rows in flight, requests by status, request latency, scheduler steps."""

    def __init__(self):
        self.queue_depth = 0
        self.rows_in_flight = 0
        self.cost_in_flight = 0
        self.steps = 0
        self.requests: collections.Counter[int] = collections.Counter()
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._lock = threading.Lock()

    def count(self, status: int, seconds: float | None = None) -> None:
        """One answer (499: the client went away first), with its latency if it is a sample's."""
        with self._lock:
            self.requests[status] += 1
            if seconds is not None:
                self._buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
                self._latency_sum += seconds

    def render(self) -> str:
        """All metrics in the Prometheus text format."""
        with self._lock:
            lines = _gauge("cfgengine_queue_depth", "requests waiting to join the batch",
                           self.queue_depth)
            lines += _gauge("cfgengine_rows_in_flight", "sample rows in the running batch",
                            self.rows_in_flight)
            lines += _gauge("cfgengine_row_cost_in_flight", "rows against --max-rows "
                            "(guided rows count twice)", self.cost_in_flight)
            lines += ["# HELP cfgengine_steps_total scheduler steps (one network call each)",
                      "# TYPE cfgengine_steps_total counter", f"cfgengine_steps_total {self.steps}"]
            lines += ["# HELP cfgengine_requests_total answers by HTTP status, every path but "
                      "/healthz and /metrics",
                      "# TYPE cfgengine_requests_total counter"]
            lines += [f'cfgengine_requests_total{{code="{code}"}} {n}'
                      for code, n in sorted(self.requests.items())]
            lines += self._histogram()
        return "\n".join(lines) + "\n"

    def _histogram(self) -> list[str]:
        name = "cfgengine_request_latency_seconds"
        lines = [f"# HELP {name} POST /v1/samples: time from arrival to answer",
                 f"# TYPE {name} histogram"]
        total = 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self._buckets):
            total += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{name}_bucket{{le="{le}"}} {total}')
        return lines + [f"{name}_sum {self._latency_sum:.6f}", f"{name}_count {total}"]


def _gauge(name: str, help_text: str, value) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
