"""Schedules through real engines on the embedded broker: each due time starts exactly one run,
with two engines sharing a store, and after a restart under each catch-up policy."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from aggregates.schedule import scheduled_run_id, timetable_id
from aggregates.store import RunStore
from schemas.definition import parse_definition
from streams.history import history
from tests.conftest import EngineFactory, kafka_for


class SetClock:
    """A clock the test sets; sleeping is short and real, so the engine notices the new time."""

    def __init__(self, now: dt.datetime) -> None:
        self.current = now

    def now(self) -> dt.datetime:
        return self.current

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(min(seconds, 0.05))


def definition(name: str, *schedules: dict[str, Any], version: int = 1) -> Any:
    return parse_definition(
        {
            "name": name,
            "version": version,
            "nodes": [{"id": "echo", "type": "transform", "config": {"output": "input"}}],
            "outputs": {"echo": "echo"},
            "schedules": list(schedules),
        }
    )


async def eventually(check: Any, timeout: float = 60.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (found := check()):
            await asyncio.sleep(0.1)
    return found


def started(store_url: str) -> list[Any]:
    store = RunStore(store_url)
    try:
        return [e for e in history(store) if e.type == "Started"]
    finally:
        store.close()


def fired_due_times(store_url: str, workflow: str) -> list[str]:
    store = RunStore(store_url)
    try:
        events = store.events.get(timetable_id(workflow))
        return [due for e in events if type(e).__name__ == "Fired" for due in e.due_times]
    finally:
        store.close()


async def test_two_engines_sharing_a_store_start_one_run_per_due_time(
    engine_factory: EngineFactory, bootstrap: str, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path}/events.db"
    kafka = kafka_for(bootstrap)
    async with engine_factory(store_url=store_url, kafka=kafka) as first:
        assert first.store is not None
        await first._in_store(
            first.store.deploy, definition("tick", {"every": 1, "inputs": {"at": "schedule.due_at"}})
        )
        async with engine_factory(store_url=store_url, kafka=kafka):
            await eventually(lambda: len(started(store_url)) >= 6)
            # Version 2 has no schedules: the ticks stop, and every fired one gets its run.
            await first._in_store(first.store.deploy, definition("tick", version=2))
            await eventually(lambda: len(started(store_url)) == len(fired_due_times(store_url, "tick")))
    runs = started(store_url)
    fired = fired_due_times(store_url, "tick")
    assert len(fired) == len(set(fired))  # no due time was decided twice
    due = sorted(dt.datetime.fromisoformat(d) for d in fired)
    assert [b - a for a, b in itertools.pairwise(due)] == [dt.timedelta(seconds=1)] * (len(due) - 1)
    expected = {scheduled_run_id("default", "tick", "0", d) for d in due}
    assert Counter(r.run_id for r in runs) == Counter(expected)  # one run per due time, none more
    delays = [(r.time - dt.datetime.fromisoformat(r.payload["input"]["at"])).total_seconds() for r in runs]
    median, worst = statistics.median(delays) * 1000, max(delays) * 1000
    print(f"\ndue time -> run started: median {median:.0f} ms, max {worst:.0f} ms")


async def test_a_restarted_engine_catches_up_missed_due_times_by_each_policy(
    engine_factory: EngineFactory, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path}/events.db"
    clock = SetClock(dt.datetime(2030, 1, 1, 0, 0, 10, tzinfo=dt.UTC))
    workflow = definition(
        "catch-up",
        {"name": "skipping", "every": "5m", "catch_up": "skip"},
        {"name": "once", "every": "5m", "catch_up": "once"},
        {"name": "all", "every": "5m", "catch_up": "all", "max_catch_up": 3},
    )

    def adopted() -> bool:
        store = RunStore(store_url)
        try:
            return any(type(e).__name__ == "Adopted" for e in store.events.get(timetable_id("catch-up")))
        finally:
            store.close()

    async with engine_factory(store_url=store_url, clock=clock) as engine:
        assert engine.store is not None
        await engine._in_store(engine.store.deploy, workflow)
        await eventually(adopted)
    assert started(store_url) == []

    # Down for an hour: 00:05 ... 01:00 were missed; at 01:03:10 the latest is 190 s late.
    clock.current = dt.datetime(2030, 1, 1, 1, 3, 10, tzinfo=dt.UTC)

    def run_of(schedule: str, hour: int, minute: int) -> str:
        due = dt.datetime(2030, 1, 1, hour, minute, tzinfo=dt.UTC)
        return scheduled_run_id("default", "catch-up", schedule, due)

    caught_up = {run_of("once", 1, 0), run_of("all", 0, 50), run_of("all", 0, 55), run_of("all", 1, 0)}
    async with engine_factory(store_url=store_url, clock=clock):
        assert {
            r.run_id
            for r in await eventually(lambda: started(store_url) if len(started(store_url)) >= 4 else None)
        } == caught_up
        clock.current = dt.datetime(2030, 1, 1, 1, 5, 0, tzinfo=dt.UTC)  # on time again: all three fire
        runs = await eventually(lambda: started(store_url) if len(started(store_url)) >= 7 else None)
    on_time = {run_of(name, 1, 5) for name in ("skipping", "once", "all")}
    assert Counter(r.run_id for r in runs) == Counter(caught_up | on_time)
