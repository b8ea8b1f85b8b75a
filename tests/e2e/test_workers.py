"""Several workers on one store and one consumer group: runs spread over them, exactly one of
them publishes run events, and when it stops another takes over."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path

import orjson

from streams.kafka import RUN_EVENTS
from tests.conftest import EngineFactory, kafka_for
from tests.e2e.kafka_tools import read_until
from tests.e2e.test_examples import example, run_to_end


async def test_two_workers_share_the_runs_and_one_outbox_then_one_takes_over(
    engine_factory: EngineFactory, tmp_path: Path, bootstrap: str
) -> None:
    kafka = kafka_for(bootstrap)
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    linear = example("linear.yaml")
    async with contextlib.AsyncExitStack() as second_stack:
        first_stack = contextlib.AsyncExitStack()
        first = await first_stack.enter_async_context(engine_factory(store_url=store_url, kafka=kafka))
        second = await second_stack.enter_async_context(engine_factory(store_url=store_url, kafka=kafka))
        await asyncio.sleep(8)  # let the group settle with both members
        assert first.app.consumer.assignment() and second.app.consumer.assignment()

        reports = await asyncio.gather(*(run_to_end(first, linear, {"n": n}) for n in range(20)))
        assert [r.outputs["result"] for r in reports] == [(2 * n) ** 2 + 1 for n in range(20)]

        # The first engine started first and leads the outbox; when it stops, the second
        # takes over publishing (and everything else) on its own.
        await first_stack.aclose()
        later = await asyncio.gather(*(run_to_end(second, linear, {"n": n}) for n in range(3)))
        assert all(r.status == "completed" for r in later)

    run_ids = {r.run_id for r in [*reports, *later]}
    expected = sum(len(r.events) for r in [*reports, *later])
    messages = await read_until(kafka, RUN_EVENTS, lambda m: len(m) >= expected, timeout=30)
    published = Counter(
        (e["run_id"], e["version"])
        for e in map(orjson.loads, (m.value for m in messages))
        if e["run_id"] in run_ids
    )
    assert len(published) == expected
    assert max(published.values()) == 1, "an event was published by more than one worker"


async def test_a_worker_stops_even_when_its_outbox_is_woken_as_it_stops(
    engine_factory: EngineFactory,
) -> None:
    running = engine_factory()
    engine = await running.__aenter__()
    await asyncio.sleep(0.5)  # the outbox loop is now waiting for work
    # New events wake the outbox (a decide batch does this); stop() lands in the same moment.
    engine._outbox_wake.set()
    await asyncio.sleep(0)
    async with asyncio.timeout(30):
        await running.__aexit__(None, None, None)
