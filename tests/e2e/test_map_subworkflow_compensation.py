"""map, subworkflow and compensation end to end through the broker, with real python nodes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aggregates.run import child_run_id
from aggregates.store import RunStore
from citadel.runs import RunReport, follow, start_command
from schemas.definition import parse_definition
from schemas.envelope import Envelope
from streams.engine import Engine
from streams.watch import watch_run
from tests.conftest import EngineFactory


def python(code: str, **inputs: str) -> dict[str, Any]:
    return {"type": "python", "config": {"code": code, "inputs": inputs}}


async def run_to_end(engine: Engine, definition: dict[str, Any], run_input: dict[str, Any]) -> RunReport:
    command = start_command(definition, run_input, tenant="acme")
    await engine.submit(command)
    return await asyncio.wait_for(follow(engine.settings.kafka, command.run_id, command.id), 60)


@pytest.fixture(scope="module")
async def deployed(
    engine_factory: EngineFactory, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Engine]:
    """An engine whose store has the child workflows deployed."""
    async with engine_factory(store_url=with_children(tmp_path_factory.mktemp("subworkflows"))) as engine:
        yield engine


def with_children(home: Path) -> str:
    """A store with the child workflows deployed (as the gateway or the CLI would)."""
    store_url = f"sqlite:///{home / 'events.db'}"
    store = RunStore(store_url)
    try:
        store.deploy(parse_definition(BILLING))
        store.deploy(parse_definition(HELD))
    finally:
        store.close()
    return store_url


BILLING = {
    "name": "billing",
    "input": {"type": "object", "required": ["amount"]},
    "nodes": [
        {
            "id": "charge",
            **python("def main(amount):\n    return {'receipt': f'r-{amount}'}\n", amount="input.amount"),
        }
    ],
    "outputs": {"receipt": "charge.receipt"},
}
HELD = {"name": "held", "nodes": [{"id": "hold", "type": "approval"}], "outputs": {}}


async def test_a_map_joins_results_in_item_order_and_never_runs_more_items_than_its_concurrency(
    engine: Engine,
) -> None:
    # Later items finish first, so completion order is the reverse of item order.
    step = python("import time\ndef main(x):\n    time.sleep((12 - x) * 0.02)\n    return x * x\n", x="item")
    definition = {
        "name": "squares",
        "nodes": [
            {
                "id": "each",
                "type": "map",
                "config": {"items": "input.xs", "concurrency": 3, "node": step},
            }
        ],
        "outputs": {"squares": "each"},
    }
    report = await run_to_end(engine, definition, {"xs": list(range(12))})
    assert report.status == "completed", report.error
    assert report.outputs == {"squares": [x * x for x in range(12)]}
    running, most = 0, 0
    for event in report.events:
        if event.type == "NodeScheduled" and event.payload["node_id"].startswith("each["):
            running += 1
            most = max(most, running)
        elif event.type == "NodeSucceeded" and event.payload["node_id"].startswith("each["):
            running -= 1
    assert most == 3


async def test_a_subworkflow_node_outputs_what_its_child_run_returned(deployed: Engine) -> None:
    definition = {
        "name": "checkout",
        "nodes": [
            {
                "id": "pay",
                "type": "subworkflow",
                "config": {"workflow": "billing", "inputs": {"amount": "input.n"}},
            }
        ],
        "outputs": {"receipt": "pay.receipt"},
    }
    report = await run_to_end(deployed, definition, {"n": 42})
    assert report.status == "completed", report.error
    assert report.outputs == {"receipt": "r-42"}
    request = next(e for e in report.events if e.type == "ChildRunRequested")
    child = await asyncio.wait_for(follow(deployed.settings.kafka, request.payload["child_run_id"]), 30)
    assert child.status == "completed"
    assert child.events[0].payload["parent"] == {
        "run_id": report.run_id,
        "node_id": "pay",
        "attempt_id": request.payload["attempt_id"],
    }


async def test_a_child_that_cannot_start_fails_the_parents_node_with_the_reason(deployed: Engine) -> None:
    definition = {
        "name": "checkout-missing",
        "nodes": [{"id": "pay", "type": "subworkflow", "config": {"workflow": "nowhere"}}],
    }
    report = await run_to_end(deployed, definition, {})
    assert report.status == "failed"
    assert "ChildRunRejected: no workflow 'nowhere' is deployed" in (report.error or "")


async def test_cancelling_the_parent_cancels_its_running_child(deployed: Engine) -> None:
    definition = {
        "name": "waits-on-child",
        "nodes": [{"id": "sub", "type": "subworkflow", "config": {"workflow": "held"}}],
    }
    command = start_command(definition, {}, tenant="acme")
    child_id = child_run_id(f"{command.run_id}:sub:1")
    await deployed.submit(command)
    async with contextlib.aclosing(watch_run(deployed.settings.kafka, child_id)) as events:
        async for event in events:
            if event.type == "ApprovalRequested":
                break
    await deployed.submit(
        Envelope.new("CancelRun", command.run_id, {"reason": "customer left"}, tenant="acme")
    )
    child = await asyncio.wait_for(follow(deployed.settings.kafka, child_id), 30)
    assert child.status == "cancelled"
    assert child.error == f"parent run {command.run_id} ended: customer left"
    parent = await asyncio.wait_for(follow(deployed.settings.kafka, command.run_id), 30)
    assert parent.status == "cancelled"


async def test_a_failing_saga_runs_the_compensations_in_reverse_order_before_failing(engine: Engine) -> None:
    def step(node_id: str, *needs: str, fails: bool = False) -> dict[str, Any]:
        body = "    raise RuntimeError('carrier down')\n" if fails else f"    return '{node_id}'\n"
        undo = python("def main(done):\n    return {'undone': done}\n", done=node_id)
        return {"id": node_id, "needs": list(needs), **python("def main():\n" + body), "compensate": undo}

    definition = {
        "name": "saga",
        "nodes": [step("reserve"), step("charge", "reserve"), step("ship", "charge", fails=True)],
    }
    report = await run_to_end(engine, definition, {})
    assert report.status == "failed"
    assert "carrier down" in (report.error or "")
    kinds = [e.type for e in report.events]
    undone = [
        (e.payload["node_id"], e.payload["output"])
        for e in report.events[kinds.index("CompensationStarted") :]
        if e.type == "NodeSucceeded"
    ]
    assert undone == [
        ("charge.compensate", {"undone": "charge"}),
        ("reserve.compensate", {"undone": "reserve"}),
    ]
    assert kinds[-1] == "Failed"


async def test_a_parent_waiting_on_its_child_across_an_engine_restart_gets_the_childs_result(
    engine_factory: EngineFactory, tmp_path: Path
) -> None:
    definition = {
        "name": "waits-across-restart",
        "nodes": [{"id": "sub", "type": "subworkflow", "config": {"workflow": "held"}}],
        "outputs": {"answer": "sub"},
    }
    command = start_command(definition, {}, tenant="acme")
    child_id = child_run_id(f"{command.run_id}:sub:1")
    store_url = with_children(tmp_path)
    async with engine_factory(store_url=store_url) as first:
        await first.submit(command)
        async with contextlib.aclosing(watch_run(first.settings.kafka, child_id)) as events:
            async for event in events:
                if event.type == "ApprovalRequested":
                    break
    # A new engine on a broker namespace that kept nothing: the child's answer still reaches the parent.
    async with engine_factory(store_url=store_url) as second:
        signal = Envelope.new("Signal", child_id, {"node_id": "hold", "payload": "yes"}, tenant="acme")
        await second.submit(signal)
        parent = await asyncio.wait_for(follow(second.settings.kafka, command.run_id), 30)
    assert parent.status == "completed", parent.error
    assert parent.outputs == {"answer": {}}
