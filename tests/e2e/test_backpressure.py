"""Backpressure and fairness through the broker: a flood of slow attempts waits in the event store
(parked by admission) rather than in the engine's memory, every attempt runs once, and a tenant
flooding the engine does not hold back another tenant's runs."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from citadel.runs import follow, start_command
from schemas.definition import parse_definition
from streams.admission import Limits
from streams.engine import Engine
from streams.kafka import COMMANDS, RUN_EVENTS, KafkaSettings
from streams.watch import topic_reader
from tests.conftest import EngineFactory, kafka_for

SLOW = "import time\ndef main(k):\n    time.sleep(0.05)\n    return k + %d\n"


def fan_out(name: str, width: int) -> dict[str, Any]:
    """`width` slow python nodes side by side, then a transform that adds up their results."""
    nodes: list[dict[str, Any]] = [
        {"id": f"n{i}", "type": "python", "config": {"inputs": {"k": "input.k"}, "code": SLOW % i}}
        for i in range(width)
    ]
    total = " + ".join(f"n{i}" for i in range(width))
    nodes.append(
        {"id": "sum", "type": "transform", "needs": [n["id"] for n in nodes], "config": {"output": total}}
    )
    return parse_definition({"name": name, "nodes": nodes, "outputs": {"total": "sum"}}).model_dump(
        mode="json"
    )


def fan_out_total(width: int, k: int) -> int:
    return width * k + width * (width - 1) // 2


def resident_mb() -> float:
    """Resident memory of this process, which hosts the engine (the broker and sandboxes do not)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@dataclass
class RunEvents:
    """What the engine has published on citadel.run-events so far, each event counted once."""

    completed: dict[str, Any] = field(default_factory=dict)  # run id -> outputs
    failed: list[str] = field(default_factory=list)
    successes: Counter[str] = field(default_factory=Counter)  # tenant -> python node successes
    seen: set[tuple[str, int]] = field(default_factory=set)


@contextlib.asynccontextmanager
async def reading_run_events(kafka: KafkaSettings) -> AsyncIterator[RunEvents]:
    events = RunEvents()
    consumer = topic_reader(kafka, RUN_EVENTS)
    await consumer.start()

    async def read() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=100, max_records=5000)
            for records in batch.values():
                for record in records:
                    event = orjson.loads(record.value)
                    key = (event["run_id"], event["version"])
                    if key in events.seen:
                        continue  # republished
                    events.seen.add(key)
                    if event["type"] == "NodeSucceeded" and event["payload"]["node_id"] != "sum":
                        events.successes[event["tenant"]] += 1
                    elif event["type"] == "Completed":
                        events.completed[event["run_id"]] = event["payload"]["outputs"]
                    elif event["type"] in ("Failed", "Cancelled"):
                        events.failed.append(event["run_id"])

    reader = asyncio.create_task(read())
    try:
        yield events
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await consumer.stop()


async def until(condition: Any, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def start_runs(engine: Engine, definition: dict[str, Any], tenant: str, count: int) -> list[str]:
    commands = [
        start_command(definition, {"k": k}, tenant=tenant, run_id=str(uuid.uuid4())) for k in range(count)
    ]
    await asyncio.gather(*(engine.submit(c) for c in commands))
    return [c.run_id for c in commands]


async def results_published(kafka: KafkaSettings, attempts: int) -> Counter[str]:
    """How often each attempt's success was reported on citadel.commands (read until all were)."""
    reported: Counter[str] = Counter()
    consumer = topic_reader(kafka, COMMANDS)
    await consumer.start()
    try:
        async with asyncio.timeout(60):
            while len(reported) < attempts:
                batch = await consumer.getmany(timeout_ms=100, max_records=5000)
                for records in batch.values():
                    for record in records:
                        command = orjson.loads(record.value)
                        if command["type"] == "NodeSucceeded":
                            reported[command["id"]] += 1
    finally:
        await consumer.stop()
    return reported


@dataclass
class Peaks:
    resident_mb: float = 0.0
    parked: int = 0
    in_flight: int = 0


async def sample(engine: Engine, peaks: Peaks) -> None:
    while True:
        peaks.resident_mb = max(peaks.resident_mb, resident_mb())
        peaks.parked = max(peaks.parked, engine.admission.parked)
        peaks.in_flight = max(peaks.in_flight, engine.admission.in_flight)
        await asyncio.sleep(0.1)


RUNS, WIDTH = 500, 20  # 10,000 attempts
TENANT_LIMIT = 64
# Measured: +44 MB, most of it the store's cache of the 500 active runs; a waiting attempt
# costs ~0.5 KB (tests/streams/test_admission.py), so the flood itself is a few MB.
RSS_GROWTH_BOUND_MB = 150


@pytest.mark.timeout(600)  # ~40 s on a quiet 2-core machine; allow for a busy one
async def test_ten_thousand_slow_attempts_wait_in_the_store_not_in_memory_and_each_runs_once(
    engine_factory: EngineFactory,
) -> None:
    definition = fan_out("flood", WIDTH)
    settings = {"executor_concurrency": 16, "admission": Limits(tenant=TENANT_LIMIT)}
    async with engine_factory(python_concurrency=16, **settings) as engine:
        kafka = engine.settings.kafka
        async with reading_run_events(kafka) as events:
            baseline = resident_mb()
            peaks = Peaks()
            sampler = asyncio.create_task(sample(engine, peaks))
            try:
                run_ids = await start_runs(engine, definition, "acme", RUNS)
                await until(lambda: len(events.completed) + len(events.failed) >= RUNS, 480, "every run")
            finally:
                sampler.cancel()
        print(
            f"\n10k attempts: RSS {baseline:.0f} MB before, peak {peaks.resident_mb:.0f} MB "
            f"(+{peaks.resident_mb - baseline:.0f} MB); peak parked {peaks.parked}, "
            f"peak in flight {peaks.in_flight}"
        )
        assert events.failed == []
        assert [events.completed[r] for r in run_ids] == [
            {"total": fan_out_total(WIDTH, k)} for k in range(RUNS)
        ]
        assert events.successes["acme"] == RUNS * WIDTH
        # Executed once each: the executors published one result per attempt.
        result_ids = await results_published(kafka, RUNS * WIDTH)
        assert len(result_ids) == RUNS * WIDTH
        assert max(result_ids.values()) == 1
        # The backlog waited in the store (parked), the executors' topic held a bounded share,
        # and memory stayed flat.
        assert peaks.parked > RUNS * WIDTH // 2
        assert peaks.in_flight <= TENANT_LIMIT
        assert peaks.resident_mb - baseline < RSS_GROWTH_BOUND_MB
        assert engine.admission.in_flight == engine.admission.parked == 0


async def test_a_tenant_flooding_the_engine_does_not_hold_back_another_tenants_runs(
    engine_factory: EngineFactory,
) -> None:
    """The flooder keeps submitting (2,000 slow attempts, faster than the executors take them);
    the neighbour's runs, started halfway, finish long before the flood does."""
    flood = fan_out("flood", 20)
    quick = fan_out("quick", 2)
    async with (
        engine_factory(python_concurrency=8, admission=Limits(tenant=16)) as engine,
        reading_run_events(engine.settings.kafka) as events,
    ):
        submitted: list[str] = []

        async def keep_flooding() -> None:
            for _ in range(20):
                submitted.extend(await start_runs(engine, flood, "flooder", 5))
                await asyncio.sleep(0.2)

        flooding = asyncio.create_task(keep_flooding())
        await until(lambda: len(submitted) >= 50, 60, "half of the flood to arrive")

        commands = [start_command(quick, {"k": k}, tenant="neighbour") for k in range(5)]
        await asyncio.gather(*(engine.submit(c) for c in commands))
        reports = await asyncio.wait_for(
            asyncio.gather(*(follow(engine.settings.kafka, c.run_id, c.id) for c in commands)), 120
        )
        assert [r.outputs for r in reports] == [{"total": fan_out_total(2, k)} for k in range(5)]
        # The neighbour's runs finished while most of the flood still waited its turn.
        flood_done = events.successes["flooder"]
        waiting = engine.admission.waiting("flooder")
        print(f"\nneighbour done after {flood_done} of the flood's attempts; {waiting} still waiting")
        assert flood_done < 500
        assert waiting > 500

        await flooding
        await until(lambda: len(events.completed) >= len(submitted) + 5, 240, "the flood to finish")
        assert events.failed == []


async def test_waiting_attempts_survive_a_restart_and_the_limits_hold_after_it(
    engine_factory: EngineFactory, bootstrap: str, tmp_path: Path
) -> None:
    """Waiting attempts live in the store as their NodeScheduled events: a restarted engine finds
    them (reconcile), offers them to admission again, and dispatches no more than the limits."""
    kafka = kafka_for(bootstrap)
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    limits = Limits(tenant=3)
    definition = fan_out("restarted", 5)
    async with reading_run_events(kafka) as events:
        async with engine_factory(store_url=store_url, kafka=kafka, admission=limits) as first:
            run_ids = await start_runs(first, definition, "acme", 6)  # 30 attempts, 3 at a time
            await until(lambda: events.successes["acme"] >= 3, 60, "a few attempts to finish")
            assert first.admission.parked > 10
        async with engine_factory(store_url=store_url, kafka=kafka, admission=limits) as second:
            await until(lambda: second.admission.in_flight > 0, 60, "the restarted engine to reconcile")
            peaks = Peaks()
            sampler = asyncio.create_task(sample(second, peaks))
            try:
                await until(lambda: len(events.completed) >= 6, 120, "every run")
            finally:
                sampler.cancel()
        assert [events.completed[r] for r in run_ids] == [{"total": fan_out_total(5, k)} for k in range(6)]
        assert peaks.parked > 10
        assert 0 < peaks.in_flight <= 3


def fetched_tasks(engine: Engine) -> int:
    """Tasks fetched from citadel.node-tasks that wait in memory for the execute agent (reaches
    into Faust: the agent's actors share one stream buffer)."""
    agent = next(a for a in engine.app.agents.values() if a.name.endswith("execute"))
    return max((actor.stream.channel.queue.qsize() for actor in agent._actors), default=0)


async def test_saturated_executors_leave_the_backlog_in_kafka_not_in_the_workers_memory(
    engine_factory: EngineFactory,
) -> None:
    """Without admission limits every attempt is published at once; the execute agent still
    fetches only a few beyond what its executors run, so the backlog stays in the topic."""
    async with (
        engine_factory(python_concurrency=2, executor_concurrency=2, admission=Limits()) as engine,
        reading_run_events(engine.settings.kafka) as events,
    ):
        run_ids = await start_runs(engine, fan_out("backlog", 20), "acme", 5)  # 100 attempts
        most = 0
        while len(events.completed) < len(run_ids):
            most = max(most, fetched_tasks(engine))
            await asyncio.sleep(0.02)
        assert events.failed == []
    assert 0 < most <= 2 * 2
