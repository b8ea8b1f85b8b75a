"""Prometheus metrics of the runs the gateway sees go by, and of the gateway itself."""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from schemas.envelope import Envelope

V = TypeVar("V")
TERMINAL = {"Completed": "completed", "Failed": "failed", "Cancelled": "cancelled"}
SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class GatewayMetrics:
    """Counts runs, node attempts and their durations from the run events, and the gateway's own work.

    `observe` is called with every published batch (a hub listener); extra text sources (the
    projector's lag) are appended to the exposition as they are."""

    def __init__(self, capacity: dict[str, int] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.runs = Counter("citadel_runs", "runs started and finished, by status", ["status"], registry=r)
        self.attempts = Counter(
            "citadel_node_attempts",
            "node attempts finished, by node type and outcome",
            ["node_type", "outcome"],
            registry=r,
        )
        self.node_seconds = Histogram(
            "citadel_node_attempt_seconds",
            "executor time of node attempts",
            ["node_type"],
            buckets=SECONDS,
            registry=r,
        )
        self.run_seconds = Histogram(
            "citadel_run_seconds", "run duration, start to end", ["status"], buckets=SECONDS, registry=r
        )
        self.in_flight = Gauge(
            "citadel_node_attempts_in_flight",
            "node attempts dispatched and not finished",
            ["node_type"],
            registry=r,
        )
        self.pool = Gauge(
            "citadel_executor_capacity",
            "node attempts an executor (sandbox pool) runs at once",
            ["node_type"],
            registry=r,
        )
        self.event_lag = Histogram(
            "citadel_run_event_publish_lag_seconds",
            "event commit to the gateway seeing it",
            buckets=SECONDS,
            registry=r,
        )
        self.subscriptions = Gauge("citadel_gateway_subscriptions", "live subscriptions", registry=r)
        for node_type, slots in (capacity or {}).items():
            self.pool.labels(node_type).set(slots)
        self._started: OrderedDict[str, dt.datetime] = OrderedDict()
        self._attempt_types: OrderedDict[str, str] = OrderedDict()
        self.sources: list[Callable[[], str]] = []

    def observe(self, batch: list[tuple[int | None, Envelope]] | list[tuple[int, Envelope]]) -> None:
        now = dt.datetime.now(dt.UTC)
        for _, event in batch:
            self.event_lag.observe(max(0.0, (now - event.time).total_seconds()))
            p = event.payload
            if event.type == "Started":
                self.runs.labels("started").inc()
                _remember(self._started, event.run_id, event.time)
            elif event.type in TERMINAL:
                status = TERMINAL[event.type]
                self.runs.labels(status).inc()
                started = self._started.pop(event.run_id, None)
                if started is not None:
                    self.run_seconds.labels(status).observe((event.time - started).total_seconds())
            elif event.type == "NodeScheduled" and not p.get("inline"):
                _remember(self._attempt_types, p["attempt_id"], p["node_type"])
                self.in_flight.labels(p["node_type"]).inc()
            elif event.type in ("NodeSucceeded", "NodeFailed"):
                node_type = self._attempt_types.pop(p.get("attempt_id", ""), None)
                if node_type is None:
                    continue  # an inline node, or dispatched before this process started
                self.in_flight.labels(node_type).dec()
                outcome = "succeeded" if event.type == "NodeSucceeded" else "failed"
                self.attempts.labels(node_type, outcome).inc()
                self.node_seconds.labels(node_type).observe(float(p.get("duration_ms") or 0) / 1000)

    def exposition(self) -> bytes:
        return generate_latest(self.registry) + "".join(source() for source in self.sources).encode()


def _remember(memory: OrderedDict[str, V], key: str, value: V) -> None:
    memory[key] = value
    while len(memory) > 100_000:
        memory.popitem(last=False)
