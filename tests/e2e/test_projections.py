"""The projector through the real broker into chDB: live projection equals a rebuild, and
events delivered again (a projector that never committed its position) change nothing."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from aggregates.store import RunStore
from citadel.projector import RunningProjector, running_projector
from citadel.runs import follow, start_command
from citadel.settings import Settings
from projections.clickhouse import Connection
from projections.rebuild import contents, rebuild
from schemas.definition import parse_definition
from schemas.envelope import Envelope
from streams.engine import Engine
from streams.history import history
from streams.kafka import RUN_EVENTS
from tests.conftest import EXAMPLES, EngineFactory

FLAKY = {
    "name": "flaky",
    "nodes": [
        {
            "id": "boom",
            "type": "python",
            "config": {"inputs": {"n": "input.n"}, "code": "def main(n):\n    raise ValueError(n)\n"},
        },
        {"id": "after", "type": "transform", "needs": ["boom"], "config": {"output": "1"}},
    ],
}
GATED = {"name": "gated", "nodes": [{"id": "review", "type": "approval"}]}


def example(name: str) -> dict[str, Any]:
    return parse_definition((EXAMPLES / name).read_text()).model_dump(mode="json")


def projector_settings(home: Path, chdb_url: str, group: str) -> Settings:
    return Settings.from_env(
        {
            "CITADEL_HOME": str(home),
            "CITADEL_CLICKHOUSE": chdb_url,
            "CITADEL_PROJECTOR_GROUP": group,
            "CITADEL_PROJECTOR_BATCH": "50",
        }
    )


@contextlib.asynccontextmanager
async def projector(
    engine: Engine, home: Path, chdb_url: str, database: str, group: str
) -> AsyncIterator[RunningProjector]:
    settings = projector_settings(home, chdb_url, group)
    async with running_projector(settings, engine.settings.kafka, database) as running:
        yield running


@pytest.fixture
def database(chdb_url: str) -> Iterator[str]:
    name = f"e_{uuid.uuid4().hex[:12]}"
    yield name
    with Connection(chdb_url, name) as connection:
        connection.client.command(f"DROP DATABASE IF EXISTS {name}")


async def mixed_workload(engine: Engine) -> list[str]:
    """Runs that complete, skip a branch, retry, fail and get cancelled, from two tenants."""
    starts = [
        *(start_command(example("linear.yaml"), {"n": n}, "acme") for n in range(4)),
        start_command(example("diamond.yaml"), {"items": [50, 70.5, 3]}, "acme"),
        start_command(example("diamond.yaml"), {"items": [1, 2]}, "globex"),
        start_command(example("retry.yaml"), {"order": "A-1"}, "globex"),
        start_command(FLAKY, {"n": 7}, "acme"),
    ]
    gated = start_command(GATED, {}, "acme")
    for command in [*starts, gated]:
        await engine.submit(command)
    reports = await asyncio.wait_for(
        asyncio.gather(*(follow(engine.settings.kafka, c.run_id, c.id) for c in starts)), 60
    )
    assert [r.status for r in reports] == ["completed"] * 7 + ["failed"]
    await engine.submit(Envelope.new("CancelRun", gated.run_id, {"reason": "no"}, tenant="acme"))
    cancelled = await asyncio.wait_for(follow(engine.settings.kafka, gated.run_id), 30)
    assert cancelled.status == "cancelled"
    return [c.run_id for c in [*starts, gated]]


async def until_projected(connection: Connection, count: int) -> None:
    """Wait (without a deadline of our own; the test timeout bounds it) for `count` audit rows."""
    while connection.client.query("SELECT count() FROM events").result_rows[0][0] < count:
        await asyncio.sleep(0.1)


async def test_live_projection_equals_a_full_rebuild_table_by_table(
    engine_factory: EngineFactory, tmp_path: Path, chdb_url: str, database: str
) -> None:
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    async with (
        engine_factory(store_url=store_url) as engine,
        projector(engine, tmp_path, chdb_url, database, f"p-{uuid.uuid4().hex[:8]}") as running,
    ):
        # Something that is not an envelope on the topic: skipped and counted, never fatal.
        await (await engine._send(engine.settings.kafka.topic(RUN_EVENTS), "junk", b"\x00not json"))
        await mixed_workload(engine)
        store = RunStore(store_url)
        try:
            events = list(history(store))
            await until_projected(running.connection, len(events))
            live = contents(running.connection.client)
            assert await running.projector.drain()
            metrics = running.projector.metrics
            assert metrics.undecodable == 1 and metrics.lag_messages == 0
            assert "citadel_projector_lag_messages 0" in metrics.prometheus()
            assert rebuild(running.connection.client, iter(events)) == len(events)
        finally:
            store.close()
        rebuilt = contents(running.connection.client)
    assert {e.type for e in events} >= {"NodeSkipped", "NodeFailed", "RetryScheduled", "Cancelled"}
    assert len(live["runs"]) == 9 and len(live["events"]) == len(events)
    for table in live:
        assert live[table] == rebuilt[table], table


async def test_events_delivered_again_from_the_beginning_duplicate_nothing(
    engine_factory: EngineFactory, tmp_path: Path, chdb_url: str, database: str
) -> None:
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    async with engine_factory(store_url=store_url) as engine:
        async with projector(engine, tmp_path, chdb_url, database, f"p-{uuid.uuid4().hex[:8]}") as first:
            await mixed_workload(engine)
            store = RunStore(store_url)
            total = len(list(history(store)))
            store.close()
            await until_projected(first.connection, total)
            before = contents(first.connection.client)
        # A projector whose position was never committed (here: a new consumer group) gets every
        # event again, from the first offset.
        async with projector(engine, tmp_path, chdb_url, database, f"p-{uuid.uuid4().hex[:8]}") as second:
            while second.projector.metrics.duplicates < total:
                await asyncio.sleep(0.1)
            after = contents(second.connection.client)
            assert second.projector.metrics.events == 0
    assert after == before


async def test_a_projector_stopped_cleanly_and_started_again_in_its_group_gets_nothing_again(
    engine_factory: EngineFactory, tmp_path: Path, chdb_url: str, database: str
) -> None:
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    group = f"p-{uuid.uuid4().hex[:8]}"
    async with engine_factory(store_url=store_url) as engine:
        async with projector(engine, tmp_path, chdb_url, database, group) as first:
            await mixed_workload(engine)
            store = RunStore(store_url)
            total = len(list(history(store)))
            store.close()
            await until_projected(first.connection, total)
        # Leaving the context stopped it cleanly: every written batch is committed, so the group
        # starts again after it, and partitions with nothing new count as projected.
        async with projector(engine, tmp_path, chdb_url, database, group) as second:
            assert await second.projector.drain()
            assert second.projector.metrics.lag_messages == 0
            assert second.projector.metrics.duplicates == 0 and second.projector.metrics.events == 0
