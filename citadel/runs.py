"""Submitting a run and following it to the end, for the CLI (and its tests)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aggregates.run import COMPENSATE
from schemas.envelope import Envelope
from streams.kafka import KafkaSettings
from streams.watch import watch_run


@dataclass
class NodeSummary:
    node_id: str
    status: str = "pending"
    attempts: int = 0
    first_scheduled: dt.datetime | None = None
    finished: dt.datetime | None = None
    error: str | None = None

    @property
    def duration_ms(self) -> float | None:
        if self.first_scheduled is None or self.finished is None:
            return None
        return (self.finished - self.first_scheduled).total_seconds() * 1000


@dataclass
class RunReport:
    run_id: str
    status: str = "running"
    outputs: dict[str, Any] | None = None
    error: str | None = None
    nodes: dict[str, NodeSummary] = field(default_factory=dict)
    events: list[Envelope] = field(default_factory=list)

    def apply(self, event: Envelope) -> None:
        self.events.append(event)
        p = event.payload
        if event.type == "Started":
            for node in p["definition"]["nodes"]:
                self.nodes[node["id"]] = NodeSummary(node["id"])
            return
        node_id = p.get("node_id") or ""
        if event.type == "NodeScheduled" and node_id.endswith(COMPENSATE):
            self.nodes.setdefault(node_id, NodeSummary(node_id))  # shown; a map's items are not
        node = self.nodes.get(node_id)
        if event.type == "NodeScheduled" and node:
            node.status, node.attempts = "running", p["attempt"]
            node.first_scheduled = node.first_scheduled or event.time
        elif event.type == "NodeSucceeded" and node:
            node.status, node.finished, node.error = "succeeded", event.time, None
        elif event.type == "NodeFailed" and node:
            node.status = "retrying" if p["will_retry"] else "failed"
            node.error = f"{p['error_class']}: {p['message']}"
            node.finished = event.time
        elif event.type == "NodeSkipped" and node:
            node.status = "skipped"
        elif event.type == "NodeReused" and node:
            node.status = "reused"
        elif event.type == "CompensationStarted":
            self.status = "compensating"
        elif event.type == "Completed":
            self.status, self.outputs = "completed", p["outputs"]
        elif event.type in ("Failed", "Cancelled"):
            self.status, self.error = event.type.lower(), p["reason"]

    @property
    def done(self) -> int:
        return sum(1 for n in self.nodes.values() if n.status in ("succeeded", "skipped", "failed", "reused"))


def start_command(
    definition: dict[str, Any], run_input: dict[str, Any], tenant: str, run_id: str | None = None
) -> Envelope:
    run_id = run_id or str(uuid.uuid4())
    return Envelope.new("StartRun", run_id, {"definition": definition, "input": run_input}, tenant=tenant)


async def follow(
    kafka: KafkaSettings,
    run_id: str,
    command_id: str | None = None,
    *,
    on_event: Callable[[RunReport, Envelope], Awaitable[None] | None] | None = None,
) -> RunReport:
    report = RunReport(run_id)
    async for event in watch_run(kafka, run_id, command_id):
        report.apply(event)
        if on_event is not None:
            result = on_event(report, event)
            if result is not None:
                await result
    return report
