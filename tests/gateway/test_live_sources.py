"""Where a gateway's live events come from: its own engine's outbox, or `citadel.run-events`
when another worker publishes; and a start the engine rejects is answered with the reason."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any, cast

import httpx

from citadel.gateway import running_gateway, standalone_gateway
from citadel.settings import Settings
from streams.engine import Engine
from tests.conftest import EngineFactory, kafka_for
from tests.e2e.processes import cluster_env
from tests.gateway.conftest import Gateway
from tests.gateway.test_end_to_end import DEPLOY, START, WATCH, collect

STOPS_AT_FIRST = {
    "name": "stops-at-first",
    "nodes": [
        {
            "id": "first",
            "type": "python",
            "config": {"code": "def main():\n    raise ValueError('no')\n"},
        },
        {"id": "second", "type": "transform", "needs": ["first"], "config": {"output": {"x": "1"}}},
    ],
}
GATED = {
    "name": "gated",
    "nodes": [
        {"id": "review", "type": "approval"},
        {"id": "done", "type": "transform", "needs": ["review"], "config": {"output": {"ok": "true"}}},
    ],
}
SIGNAL = """mutation($r: String!, $n: String!) { signal(runId: $r, nodeId: $n, payload: {}) { runId } }"""
RERUN = """mutation($r: String!, $n: String!) { rerun(runId: $r, fromNode: $n) { runId } }"""


async def assert_a_start_the_engine_rejects_is_answered_with_its_reason(gateway: Gateway) -> None:
    await gateway.data(DEPLOY, {"d": STOPS_AT_FIRST})
    started = (await gateway.data(START, {"w": "stops-at-first", "i": {}}))["startRun"]
    events = await asyncio.wait_for(collect(gateway, started["runId"]), 60)
    assert events[-1]["type"] == "Failed"
    # `second` never ran because `first` failed: the engine refuses to rerun from it.
    body = await gateway.graphql(RERUN, {"r": started["runId"], "n": "second"})
    (error,) = body["errors"]
    assert error["extensions"]["code"] == "REJECTED", error
    assert "upstream node(s) 'first' did not finish" in error["message"]


async def assert_runs_are_watched_live_to_completion(gateway: Gateway) -> None:
    await gateway.data(DEPLOY, {"d": GATED})
    started = (await gateway.data(START, {"w": "gated", "i": {}}))["startRun"]
    events: list[dict[str, Any]] = []

    async def watch() -> None:
        async for payload in gateway.subscribe(WATCH, {"r": started["runId"], "v": 1}):
            events.append(payload["data"]["runEvents"])

    watching = asyncio.create_task(watch())
    while not events:  # the subscription has read the stored history: now it is live
        await asyncio.sleep(0.05)
    # Everything after the approval can only reach this gateway through the topic.
    await gateway.data(SIGNAL, {"r": started["runId"], "n": "review"})
    await asyncio.wait_for(watching, 60)
    assert [e["version"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "Completed"
    await assert_a_start_the_engine_rejects_is_answered_with_its_reason(gateway)


async def test_a_start_the_engine_rejects_is_answered_with_its_reason(gateway: Gateway) -> None:
    await assert_a_start_the_engine_rejects_is_answered_with_its_reason(gateway)


async def test_a_gateway_beside_a_worker_that_does_not_publish_streams_runs_from_the_topic(
    engine_factory: EngineFactory, tmp_path: Path, bootstrap: str
) -> None:
    kafka = kafka_for(bootstrap)
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    settings = Settings.from_env(
        {
            "CITADEL_HOME": str(tmp_path),
            "CITADEL_EVENT_STORE": store_url,
            "CITADEL_GATEWAY_PORT": "0",
            "CITADEL_GATEWAY_BURST": "100000",
            "CITADEL_GATEWAY_RATE": "100000",
        }
    )
    async with engine_factory(store_url=store_url, kafka=kafka) as publisher:
        while not publisher.publishing:
            await asyncio.sleep(0.1)
        async with (
            engine_factory(store_url=store_url, kafka=kafka) as follower,
            running_gateway(settings, follower, None, tail=True) as running,
            httpx.AsyncClient(base_url=running.url, timeout=30) as http,
        ):
            await assert_runs_are_watched_live_to_completion(Gateway(running, follower, http))
            assert not follower.publishing, "the second worker should not have led the outbox"


async def test_a_gateway_of_its_own_process_serves_runs_beside_the_workers(
    engine_factory: EngineFactory, tmp_path: Path, bootstrap: str
) -> None:
    kafka = kafka_for(bootstrap)
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    # `citadel gateway`'s settings: the workers' broker, topics and store, keys of its own.
    settings = Settings.from_env(
        {
            **cluster_env(kafka, tmp_path),
            "CITADEL_EVENT_STORE": store_url,
            "CITADEL_JWT_SECRET": secrets.token_urlsafe(32),
            "CITADEL_GATEWAY_PORT": "0",
        }
    )
    async with (
        engine_factory(store_url=store_url, kafka=kafka),
        standalone_gateway(settings) as running,
        httpx.AsyncClient(base_url=running.url, timeout=30) as http,
    ):
        assert running.development_token is None  # production settings: no development token
        await assert_runs_are_watched_live_to_completion(Gateway(running, cast(Engine, None), http))
