"""wait and approval end to end through the broker, each across an engine restart."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from aggregates.store import RunStore
from citadel.runs import follow, start_command
from schemas.envelope import Envelope
from streams.watch import watch_run
from tests.conftest import EngineFactory

GATED = {
    "name": "gated",
    "nodes": [
        {"id": "pause", "type": "wait", "config": {"seconds": 2}},
        {"id": "review", "type": "approval", "needs": ["pause"]},
        {
            "id": "done",
            "type": "transform",
            "needs": ["review"],
            "config": {"output": "'approved by ' + review.payload.by"},
        },
    ],
    "outputs": {"message": "done"},
}


async def test_wait_and_approval_survive_engine_restarts(
    engine_factory: EngineFactory, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    command = start_command(GATED, {}, "acme")
    # Engine 1 starts the wait, then goes away before the timer is due.
    async with engine_factory(store_url=store_url) as first:
        await first.submit(command)
        async with contextlib.aclosing(watch_run(first.settings.kafka, command.run_id)) as events:
            async for event in events:
                if event.type == "WaitScheduled":
                    break
    # Engine 2 (on a broker namespace that kept nothing) re-arms the wait; the approval opens.
    async with (
        engine_factory(store_url=store_url) as second,
        contextlib.aclosing(watch_run(second.settings.kafka, command.run_id)) as events,
    ):
        async for event in events:
            if event.type == "ApprovalRequested":
                break
    # Engine 3 takes the signal and the run finishes.
    async with engine_factory(store_url=store_url) as third:
        await third.submit(
            Envelope.new(
                "Signal", command.run_id, {"node_id": "review", "payload": {"by": "ana"}}, tenant="acme"
            )
        )
        report = await asyncio.wait_for(follow(third.settings.kafka, command.run_id), 30)
    assert report.status == "completed"
    assert report.outputs == {"message": "approved by ana"}
    # The third broker saw only what happened after it started; the store has it all.
    store = RunStore(store_url)
    try:
        history = {type(e).__name__: e.timestamp for e in store.run_events(command.run_id)}
    finally:
        store.close()
    assert (history["ApprovalRequested"] - history["WaitScheduled"]).total_seconds() >= 2
