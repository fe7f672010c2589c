"""The gateway's Prometheus metrics (served on SUBSIDY_METRICS_LISTEN by server/processes/http.py;
with several workers, prometheus_client's multiprocess mode gathers every worker's values in
the parent: server/processes/gateway.py).

Recorded by the call guard wrapped around every handler (server/rpc/handlers.py), in the same
wrapper that maps errors, so the instrumentation adds no wrapper of its own: a call costs one
clock read before, one after, one counter and one histogram update (children looked up once per
method, at registration).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from subsidy_client.v1 import authorization_pb2

CALLS = Counter("subsidy_grpc_calls", "Calls answered, by method and status code", ["method", "code"])
CALL_SECONDS = Histogram(
    "subsidy_grpc_call_seconds",
    "Time from the request's arrival in the handler to its answer, by method",
    ["method"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
DECISIONS = Counter(
    "subsidy_authorize_decisions", "Authorize answers by decision and decline reason", ["decision", "reason"]
)
SWEEPER_EXPIRED = Counter("subsidy_sweeper_expired", "Holds and qualifications expired by this gateway", ["kind"])
SWEEPER_BACKLOG = Gauge(
    "subsidy_sweeper_backlog",
    "Sweepers' work overdue by more than a minute or set aside (alert when > 0), as last read",
    ["kind"],
    multiprocess_mode="max",
)


def _decision_child(decision: Any, reason: Any) -> Any:
    return DECISIONS.labels(
        authorization_pb2.Decision.Name(decision),
        authorization_pb2.DeclineReason.Name(reason).removeprefix("DECLINE_REASON_"),
    )


class CallMetrics:
    """One method's children, looked up once: ``done(code, response)`` records a call."""

    def __init__(self, method: str) -> None:
        self._method = method
        self._seconds = CALL_SECONDS.labels(method)
        self._ok = CALLS.labels(method, "OK")
        self._decisions: dict[tuple[Any, Any], Any] = {}
        self._is_authorize = method.endswith("/Authorize")

    def started(self) -> float:
        return time.perf_counter()

    def done(self, started: float, code: str, response: Any = None) -> None:
        self._seconds.observe(time.perf_counter() - started)
        if code == "OK":
            self._ok.inc()
            if self._is_authorize and response is not None:
                key = (response.decision, response.decline_reason)
                child = self._decisions.get(key)
                if child is None:
                    child = self._decisions[key] = _decision_child(*key)
                child.inc()
        else:
            CALLS.labels(self._method, code).inc()
