"""Schedules in motion: starts the runs of due times of every deployed workflow's timetable.

Every worker runs a scheduler, and none needs to lead: the store decides. A scheduler learns
from the store's Deployed notifications which workflows may have schedules, sleeps until the
earliest due time, then fires: it loads the workflow's timetable fresh, lets it decide
(aggregates/schedule.py), publishes a StartRun for each firing and then saves the timetable
with optimistic concurrency.

- Two workers firing the same due time publish the same StartRun (the run id derives from
  the due time; the second start of a run is a duplicate), and only one save succeeds: the
  other worker reloads and finds nothing due.
- Publishing before saving means a crash in between loses nothing: after the restart the due
  time is still due and fires again, as a duplicate.
- A restarted engine finds the due times it missed in the timetable and applies the
  schedule's catch-up policy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from eventsourcing.persistence import IntegrityError

from aggregates.schedule import Firing, Timetable
from aggregates.store import RunStore, TopicFollower
from aggregates.workflow import DEPLOYED, REGISTERED
from schemas.envelope import Envelope
from streams.clock import Clock

log = logging.getLogger(__name__)
InStore = Callable[..., Awaitable[Any]]
Submit = Callable[[Envelope], Awaitable[None]]


def start_command(timetable: Timetable, firing: Firing, now: dt.datetime) -> Envelope:
    """The StartRun of a due time: its id is the run's, so a repeat is recognised."""
    return Envelope.new(
        "StartRun",
        firing.run_id,
        {"workflow": timetable.workflow, "workflow_version": firing.workflow_version, "input": firing.input},
        id=f"{firing.run_id}:scheduled",
        tenant=timetable.tenant,
        time=now,
    )


class Scheduler:
    """`poll_seconds`: how soon a deployment made by another process is noticed."""

    def __init__(
        self, store: RunStore, in_store: InStore, submit: Submit, clock: Clock, poll_seconds: float = 1.0
    ) -> None:
        self._store = store
        self._in_store = in_store
        self._submit = submit
        self._clock = clock
        self._poll_seconds = poll_seconds
        self._deployments = TopicFollower(REGISTERED, DEPLOYED)
        self._due: dict[str, dt.datetime] = {}  # workflow -> its timetable's next due time
        self._names: dict[uuid.UUID, str] = {}  # workflow aggregate id -> workflow name

    async def run(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The store is unreachable, say: nothing was saved, so nothing is lost; try again.
                log.exception("firing schedules failed; retrying")
                await self._clock.sleep(self._poll_seconds)

    async def _tick(self) -> None:
        now = self._clock.now()
        for workflow in await self._in_store(self._deployed):
            self._due[workflow] = now  # a new version: adopt its schedules now
        for workflow, due in list(self._due.items()):
            if due > now:
                continue
            try:
                await self._fire(workflow, now)
            except IntegrityError:
                self._due[workflow] = now  # another worker saved first: read what it decided
            except Exception:
                # One workflow's trouble must not hold up the others' schedules.
                log.exception("firing the schedules of %s failed; trying again", workflow)
                self._due[workflow] = now + dt.timedelta(seconds=self._poll_seconds)
        wake = min(self._due.values(), default=None)
        delay = self._poll_seconds
        if wake is not None:
            delay = min(delay, (wake - self._clock.now()).total_seconds())
        if delay > 0:
            await self._clock.sleep(delay)

    def _deployed(self) -> set[str]:
        """The workflows a version of which was deployed since the last call."""
        deployed: set[str] = set()
        for topic, found in self._deployments.read(self._store):
            if topic == REGISTERED:
                self._names[found.originator_id] = found.name
            else:
                deployed.add(self._names[found.originator_id])
        return deployed

    async def _fire(self, workflow: str, now: dt.datetime) -> None:
        timetable: Timetable | None = await self._in_store(self._store.timetable, workflow, now)
        if timetable is None:
            self._due.pop(workflow, None)
            return
        firings = timetable.fire(now)
        deliveries = []
        for firing in firings:
            if firing.error is not None:
                log.warning(
                    "schedule %r of %s at %s starts no run: %s",
                    firing.schedule,
                    workflow,
                    firing.due_at.isoformat(),
                    firing.error,
                )
                continue
            deliveries.append(self._submit(start_command(timetable, firing, self._clock.now())))
        await asyncio.gather(*deliveries)
        await self._in_store(self._store.save, timetable)
        upcoming = timetable.next_due()
        if upcoming is None:
            self._due.pop(workflow, None)
        else:
            self._due[workflow] = upcoming
