"""Durable timers: due times live in the event store (RetryScheduled); this fires them on time.

On start the engine re-arms every pending timer of every active run, so a timer survives
any restart; firing twice is harmless because TimerFired carries a deterministic command id.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
from collections.abc import Awaitable, Callable

from streams.clock import Clock

Fire = Callable[[str, str, str], Awaitable[None]]  # (timer id, run id, tenant)


class Timers:
    def __init__(self, clock: Clock, fire: Fire) -> None:
        self._clock = clock
        self._fire = fire
        self._heap: list[tuple[dt.datetime, str, str, str]] = []
        self._armed: set[str] = set()
        self._changed = asyncio.Event()

    def arm(self, timer_id: str, run_id: str, tenant: str, due_at: dt.datetime) -> None:
        if timer_id in self._armed:
            return
        self._armed.add(timer_id)
        heapq.heappush(self._heap, (due_at, timer_id, run_id, tenant))
        self._changed.set()

    def __len__(self) -> int:
        return len(self._heap)

    async def run(self) -> None:
        while True:
            self._changed.clear()
            if not self._heap:
                await self._changed.wait()
                continue
            due_at, timer_id, run_id, tenant = self._heap[0]
            delay = (due_at - self._clock.now()).total_seconds()
            if delay > 0:
                sleeper = asyncio.ensure_future(self._clock.sleep(delay))
                changed = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait({sleeper, changed}, return_when=asyncio.FIRST_COMPLETED)
                sleeper.cancel()
                changed.cancel()
                continue
            heapq.heappop(self._heap)
            self._armed.discard(timer_id)
            await self._fire(timer_id, run_id, tenant)
