"""Timers fire at their due time on the injected clock, in due order, once each."""

from __future__ import annotations

import asyncio
import datetime as dt

from streams.timers import Timers

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class FakeClock:
    """Time moves only when the test says so; sleepers wake when their time has come."""

    def __init__(self) -> None:
        self.current = T0
        self._moved = asyncio.Event()

    def now(self) -> dt.datetime:
        return self.current

    async def sleep(self, seconds: float) -> None:
        until = self.current + dt.timedelta(seconds=seconds)
        while self.current < until:
            self._moved.clear()
            await self._moved.wait()

    async def advance(self, seconds: float) -> None:
        self.current += dt.timedelta(seconds=seconds)
        self._moved.set()
        for _ in range(5):
            await asyncio.sleep(0)


async def test_timers_fire_in_due_order_only_when_due_and_once_each() -> None:
    clock = FakeClock()
    fired: list[str] = []

    async def fire(timer_id: str, run_id: str, tenant: str) -> None:
        fired.append(timer_id)

    timers = Timers(clock, fire)
    runner = asyncio.create_task(timers.run())
    try:
        timers.arm("late", "r1", "t", T0 + dt.timedelta(seconds=30))
        timers.arm("early", "r2", "t", T0 + dt.timedelta(seconds=10))
        timers.arm("early", "r2", "t", T0 + dt.timedelta(seconds=10))  # armed twice: fires once
        await clock.advance(9)
        assert fired == []
        await clock.advance(1)
        assert fired == ["early"]
        await clock.advance(19)
        assert fired == ["early"]
        await clock.advance(1)
        assert fired == ["early", "late"]
        timers.arm("overdue", "r3", "t", T0)  # due in the past (after a restart): fires at once
        await clock.advance(0)
        assert fired == ["early", "late", "overdue"]
        assert len(timers) == 0
    finally:
        runner.cancel()
