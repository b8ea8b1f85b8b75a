"""rebuildProjections while the live projector writes: nothing lost, nothing written twice."""

from __future__ import annotations

import asyncio
from typing import Any

from projections.rebuild import contents
from tests.gateway.conftest import LINEAR, Gateway
from tests.gateway.test_end_to_end import DEPLOY, START, collect

REBUILD = "mutation { rebuildProjections }"


async def projected_events(gateway: Gateway, run_ids: list[str]) -> int:
    analytics = gateway.running.backend.analytics
    assert analytics is not None
    query = "SELECT count() FROM events WHERE run_id IN %(runs)s"
    result = await gateway.running.backend.in_clickhouse(analytics.client.query, query, {"runs": run_ids})
    return int(result.result_rows[0][0])


async def test_rebuilding_while_runs_are_projected_loses_and_doubles_nothing(gateway: Gateway) -> None:
    await gateway.data(DEPLOY, {"d": LINEAR})

    async def run(n: int) -> tuple[str, list[dict[str, Any]]]:
        started = (await gateway.data(START, {"w": "linear", "i": {"n": n}}))["startRun"]
        return started["runId"], await asyncio.wait_for(collect(gateway, started["runId"]), 120)

    runs = [asyncio.create_task(run(n)) for n in range(16)]
    await asyncio.sleep(0.3)  # runs in flight, their events on the way to the projector
    rebuilt = await gateway.data(REBUILD)
    assert rebuilt["rebuildProjections"] > 0
    histories = await asyncio.gather(*runs)
    run_ids = [run_id for run_id, _ in histories]
    expected = sum(len(events) for _, events in histories)
    for _ in range(600):
        if await projected_events(gateway, run_ids) >= expected:
            break
        await asyncio.sleep(0.1)
    assert await projected_events(gateway, run_ids) == expected

    # The live tables now equal a rebuild of them from the store: the two converged.
    backend = gateway.running.backend
    assert backend.analytics is not None
    live = await backend.in_clickhouse(contents, backend.analytics.client)
    await gateway.data(REBUILD)
    assert await backend.in_clickhouse(contents, backend.analytics.client) == live
