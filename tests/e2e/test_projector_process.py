"""`citadel projector`, a process of its own, SIGKILLed in the middle of a backlog and started
again: the projections end equal, table by table, to a rebuild from the event store (nothing
lost with the killed process, nothing counted twice from the batches it wrote but did not
commit)."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from aggregates.store import RunStore
from citadel.runs import follow, start_command
from projections.clickhouse import Connection
from projections.rebuild import contents, rebuild
from streams.history import history
from streams.kafka import RUN_EVENTS, KafkaSettings
from tests.conftest import EngineFactory, kafka_for
from tests.e2e.kafka_tools import group_offsets
from tests.e2e.processes import cluster_env, log_of, start_citadel, stop
from tests.e2e.test_projections import example, mixed_workload

pytestmark = pytest.mark.timeout(300)


async def committed_and_ends(kafka: KafkaSettings, group: str) -> tuple[int, int]:
    """The run-event offsets `group` has committed, and the topic's end offsets, summed over its
    partitions."""
    partitions = [TopicPartition(kafka.topic(RUN_EVENTS), p) for p in range(kafka.partitions)]
    async with group_offsets(kafka, group) as consumer:
        done = sum([(await consumer.committed(tp)) or 0 for tp in partitions])
        ends = sum((await consumer.end_offsets(partitions)).values())
        return done, ends


async def test_a_projector_killed_mid_backlog_and_started_again_equals_a_rebuild(
    engine_factory: EngineFactory, bootstrap: str, tmp_path: Path
) -> None:
    kafka = kafka_for(bootstrap)
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    group = f"p-{uuid.uuid4().hex[:8]}"
    chdb = tmp_path / "clickhouse"
    env = {
        **cluster_env(kafka, tmp_path),
        "CITADEL_CLICKHOUSE": f"chdb://{chdb}",
        "CITADEL_PROJECTOR_GROUP": group,
        "CITADEL_PROJECTOR_BATCH": "25",
        "CITADEL_PROJECTOR_BATCH_MS": "20",
    }
    async with engine_factory(store_url=store_url, kafka=kafka) as engine:
        # A backlog: every kind of run, then 40 more, all ended before the projector starts.
        await mixed_workload(engine)
        more = [start_command(example("linear.yaml"), {"n": n}, "acme") for n in range(40)]
        for command in more:
            await engine.submit(command)
        await asyncio.wait_for(asyncio.gather(*(follow(kafka, c.run_id, c.id) for c in more)), 120)

        first = start_citadel("projector", tmp_path, env, "first")
        try:
            async with asyncio.timeout(120):
                while (progress := await committed_and_ends(kafka, group))[0] == 0:
                    assert first.poll() is None, log_of(tmp_path, "first")
                    await asyncio.sleep(0.02)
            first.send_signal(signal.SIGKILL)
            first.wait(30)
            done, ends = await committed_and_ends(kafka, group)
            assert 0 < done < ends, f"the projector was not killed half-way ({done} of {ends})"

            second = start_citadel("projector", tmp_path, env, "second")
            try:
                async with asyncio.timeout(120):
                    while (progress := await committed_and_ends(kafka, group))[0] < progress[1]:
                        assert second.poll() is None, log_of(tmp_path, "second")
                        await asyncio.sleep(0.1)
            finally:
                assert stop(second, timeout=60) == 0, log_of(tmp_path, "second")
        finally:
            stop(first, signal.SIGKILL)

    store = RunStore(store_url)
    try:
        events = list(history(store))
    finally:
        store.close()
    with Connection(f"chdb://{chdb}") as connection:
        live = contents(connection.client)
        assert rebuild(connection.client, iter(events)) == len(events)
        rebuilt = contents(connection.client)
    assert len(live["events"]) == len(events) and len(live["runs"]) == 49
    for table in live:
        assert live[table] == rebuilt[table], table
