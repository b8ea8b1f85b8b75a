"""Deploy, start, watch live to completion, catch up from version 0: through the real broker."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.gateway.conftest import LINEAR, Gateway

DEPLOY = """mutation($d: JSON!) { deployWorkflow(definition: $d) {
  workflow version created problems { location message node } } }"""
START = """mutation($w: String!, $i: JSON, $k: String) {
  startRun(workflow: $w, input: $i, idempotencyKey: $k) { runId commandId } }"""
WATCH = """subscription($r: String!, $v: Int!) {
  runEvents(runId: $r, fromVersion: $v) { version type nodeId } }"""
RUN = """query($r: String!) { run(id: $r) { id workflow status outputs
  nodes { id status attempt } attempts { nodeId attempt status durationMs } } }"""


async def collect(gateway: Gateway, run_id: str, from_version: int = 0) -> list[dict[str, Any]]:
    return [
        payload["data"]["runEvents"]
        async for payload in gateway.subscribe(WATCH, {"r": run_id, "v": from_version})
    ]


async def test_a_deployed_workflow_runs_and_is_watched_live_to_completion(gateway: Gateway) -> None:
    deployed = (await gateway.data(DEPLOY, {"d": LINEAR}))["deployWorkflow"]
    assert deployed == {"workflow": "linear", "version": 1, "created": True, "problems": []}
    started = (await gateway.data(START, {"w": "linear", "i": {"n": 3}, "k": "order-1"}))["startRun"]
    events = await asyncio.wait_for(collect(gateway, started["runId"], 1), 60)
    assert [e["version"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "Started" and events[-1]["type"] == "Completed"
    run = (await gateway.data(RUN, {"r": started["runId"]}))["run"]
    assert run["status"] == "completed" and run["outputs"] == {"result": 36}
    assert run["workflow"] == "linear"
    assert {(a["nodeId"], a["status"]) for a in run["attempts"]} == {
        ("double", "succeeded"),
        ("square", "succeeded"),
    }
    # Catching up from version 0 after the end gives the same events, with no gap and no duplicate.
    assert await asyncio.wait_for(collect(gateway, started["runId"], 0), 30) == events


async def test_the_same_idempotency_key_returns_the_same_run(gateway: Gateway) -> None:
    await gateway.data(DEPLOY, {"d": LINEAR})
    first = (await gateway.data(START, {"w": "linear", "i": {"n": 1}, "k": "same"}))["startRun"]
    second = (await gateway.data(START, {"w": "linear", "i": {"n": 1}, "k": "same"}))["startRun"]
    assert first["runId"] == second["runId"]
    events = await asyncio.wait_for(collect(gateway, first["runId"]), 60)
    assert [e["type"] for e in events].count("Started") == 1


async def test_a_workflow_deployed_through_the_gateway_is_started_by_its_trigger_for_its_tenant(
    gateway: Gateway,
) -> None:
    from tests.streams.test_triggers import order, orders, publish, started_runs, user_topic

    kafka = gateway.engine.settings.kafka
    # Tenant acme's topic `orders-…` is `acme.orders-…` on the broker: its own namespace.
    topic = await user_topic(kafka, prefix="acme.")
    broken = orders("hooked", "citadel.run-events")
    refused = (await gateway.data(DEPLOY, {"d": broken}))["deployWorkflow"]
    assert [p["location"] for p in refused["problems"]] == ["triggers[0].topic"]

    deployed = (await gateway.data(DEPLOY, {"d": orders("hooked", topic.removeprefix("acme."))}))[
        "deployWorkflow"
    ]
    assert deployed["created"] and deployed["problems"] == []
    await publish(kafka, topic, [order("G-1", 15.0)])

    (run_id,) = await started_runs(kafka, "acme.hooked", 1)
    run = (await gateway.data(RUN, {"r": run_id}))["run"]
    assert run["workflow"] == "hooked"


async def test_watching_a_run_whose_history_goes_on_after_its_end_still_ends(gateway: Gateway) -> None:
    told = {
        "name": "told",
        "nodes": [{"id": "a", "type": "transform", "config": {"output": "1"}}],
        "notify": [{"url": "http://127.0.0.1:9/unreachable", "retry": {"max_attempts": 1}}],
    }
    assert (await gateway.data(DEPLOY, {"d": told}))["deployWorkflow"]["problems"] == []
    run_id = (await gateway.data(START, {"w": "told", "i": {}}))["startRun"]["runId"]
    async with asyncio.timeout(60):
        while True:  # the run ended, then its one delivery attempt failed
            events = await asyncio.wait_for(collect(gateway, run_id, 1), 60)
            if events[-1]["type"] == "NotificationAttempted":
                break
            await asyncio.sleep(0.2)
    types = [e["type"] for e in events]
    assert types[-3:] == ["Completed", "NotificationsScheduled", "NotificationAttempted"]
