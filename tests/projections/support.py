"""Hand-made run histories with chosen times, durations and errors, as the engine publishes them."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from schemas.envelope import Envelope

T0 = dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Attempt:
    node_id: str
    node_type: str
    outcome: str  # succeeded | failed | skipped
    duration_ms: float = 0.0
    error_class: str = ""


def run_history(
    workflow: str,
    attempts: list[Attempt],
    end: str = "Completed",
    tenant: str = "acme",
    start: dt.datetime = T0,
    step: dt.timedelta = dt.timedelta(seconds=1),
    run_id: str | None = None,
) -> list[Envelope]:
    """A run's events: Started, then each attempt scheduled and finished one `step` apart, then `end`."""
    run_id = run_id or str(uuid.uuid4())
    nodes = sorted({a.node_id: a.node_type for a in attempts}.items())
    events: list[Envelope] = []
    clock = start

    def emit(kind: str, **payload: object) -> None:
        nonlocal clock
        version = len(events) + 1
        events.append(
            Envelope(
                id=f"{run_id}:{version}",
                type=kind,
                run_id=run_id,
                tenant=tenant,
                time=clock,
                version=version,
                payload=payload,
            )
        )
        clock += step

    emit(
        "Started",
        workflow=workflow,
        workflow_version=1,
        definition={"name": workflow, "nodes": [{"id": n, "type": t} for n, t in nodes]},
        tenant=tenant,
        command_id="c",
    )
    numbers: dict[str, int] = {}
    for a in attempts:
        if a.outcome == "skipped":
            emit("NodeSkipped", node_id=a.node_id, reason="when is false", command_id="c")
            continue
        number = numbers[a.node_id] = numbers.get(a.node_id, 0) + 1
        attempt_id = f"{run_id}:{a.node_id}:{number}"
        emit(
            "NodeScheduled",
            node_id=a.node_id,
            attempt=number,
            attempt_id=attempt_id,
            node_type=a.node_type,
            inline=False,
            command_id="c",
        )
        if a.outcome == "succeeded":
            emit("NodeSucceeded", node_id=a.node_id, attempt_id=attempt_id, duration_ms=a.duration_ms)
        else:
            emit(
                "NodeFailed",
                node_id=a.node_id,
                attempt_id=attempt_id,
                error_class=a.error_class,
                message="boom",
                duration_ms=a.duration_ms,
                will_retry=False,
            )
    emit(end, reason="" if end == "Completed" else "it ended", outputs={}, command_id="c")
    return events
