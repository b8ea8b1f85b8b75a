"""The `Timetable` aggregate: a workflow's schedules and the last due time each has fired. No I/O.

One timetable per workflow. `adopt` takes the schedules of the latest deployed version; `fire`
decides, for a moment `now`, which due times start runs under each schedule's catch-up policy,
and records how far each schedule has got. Saved with optimistic concurrency, that record is
the one truth among workers and restarts. The run of a due time has an id derived from the
tenant, workflow, schedule and due time, so a due time that two workers (or one worker before
and after a crash) both decide to fire still starts one run.

Due times of a cron expression are wall-clock times in the schedule's time zone, each firing
once: a wall time that occurs twice (clocks going back) fires at its first occurrence; one
that a spring-forward skips fires as the clocks jump, shifted by the gap.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from croniter import croniter
from eventsourcing.domain import Aggregate, event

from schemas.definition import SCHEDULE, Schedule, WorkflowDefinition
from schemas.expressions import ExpressionError, evaluate_mapping

TIMETABLES = uuid.UUID("9a3e5c1d-2b7f-4e80-a6d4-0c5b8f1e2d73")
SCHEDULED_RUNS = uuid.UUID("c4e8b2a1-7d3f-4a96-8e15-3f0a9d6b4c27")
# A due time older than this when its schedule fires counts as missed (for `catch_up: skip`).
MISFIRE_GRACE = dt.timedelta(seconds=60)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_SCAN_LIMIT = 100_000  # cron steps looked at for one answer: far beyond any real expression's needs


def timetable_id(workflow: str) -> uuid.UUID:
    return uuid.uuid5(TIMETABLES, workflow)


def scheduled_run_id(tenant: str, workflow: str, schedule: str, due_at: dt.datetime) -> str:
    """The run a due time starts: the same for every worker that fires it."""
    moment = due_at.astimezone(dt.UTC).isoformat()
    return str(uuid.uuid5(SCHEDULED_RUNS, f"{tenant}/{workflow}/{schedule}/{moment}"))


@dataclass(frozen=True)
class Firing:
    """A due time to start a run for: its input, or why the input could not be made."""

    schedule: str
    due_at: dt.datetime
    run_id: str
    workflow_version: int
    input: dict[str, Any]
    error: str | None = None


class Timetable(Aggregate):
    @staticmethod
    def create_id(workflow: str, **_: Any) -> uuid.UUID:
        return timetable_id(workflow)

    @event("Registered")
    def __init__(self, workflow: str, tenant: str) -> None:
        self.workflow = workflow
        self.tenant = tenant
        self.workflow_version = 0  # the version whose schedules are in force
        # schedule name -> {spec, timing, since, last_due}: times as RFC 3339 text
        self.entries: dict[str, dict[str, Any]] = {}

    # ---- decisions -------------------------------------------------------

    def adopt(self, definition: WorkflowDefinition, now: dt.datetime) -> None:
        """Put the schedules of `definition` (the latest version) in force, unless they are.

        A schedule of the new version with the same name and timing as one in force keeps how
        far it got, so no due time fires twice; any other starts with due times after `now`.
        """
        if definition.version <= self.workflow_version:
            return
        entries = {}
        for index, schedule in enumerate(definition.schedules):
            name = schedule.name or str(index)
            timing = list(schedule.timing())
            known = self.entries.get(name)
            kept = known is not None and known["timing"] == timing
            entries[name] = {
                "spec": schedule.model_dump(mode="json"),
                "timing": timing,
                "since": known["since"] if known is not None and kept else now.isoformat(),
                "last_due": known["last_due"] if known is not None and kept else None,
            }
        self._adopted(workflow_version=definition.version, entries=entries)

    def fire(self, now: dt.datetime) -> list[Firing]:
        """The due times up to `now` to start runs for, recording that each schedule got to `now`."""
        firings: list[Firing] = []
        for name, entry in self.entries.items():
            schedule = Schedule.model_validate(entry["spec"])
            after = dt.datetime.fromisoformat(entry["last_due"] or entry["since"])
            limit = 1 if schedule.catch_up == "once" else schedule.max_catch_up
            due = due_times(schedule, after, now, limit)
            if not due:
                continue
            fired = [d for d in due if now - d <= MISFIRE_GRACE] if schedule.catch_up == "skip" else due
            firings.extend(self._firing(name, schedule, d) for d in fired)
            self._fired(schedule=name, through=due[-1].isoformat(), due_times=[d.isoformat() for d in fired])
        return firings

    def next_due(self) -> dt.datetime | None:
        """The earliest due time of any schedule in force that has not fired."""
        found = [
            next_due_time(
                Schedule.model_validate(entry["spec"]),
                dt.datetime.fromisoformat(entry["last_due"] or entry["since"]),
            )
            for entry in self.entries.values()
        ]
        return min(found) if found else None

    def _firing(self, name: str, schedule: Schedule, due_at: dt.datetime) -> Firing:
        run_id = scheduled_run_id(self.tenant, self.workflow, name, due_at)
        context = {SCHEDULE: {"name": name, "due_at": due_at.isoformat(), "workflow": self.workflow}}
        try:
            computed = evaluate_mapping(schedule.inputs, context)
        except ExpressionError as exc:
            return Firing(name, due_at, run_id, self.workflow_version, {}, f"schedules.{name}.inputs.{exc}")
        return Firing(name, due_at, run_id, self.workflow_version, {**schedule.input, **computed})

    # ---- events ----------------------------------------------------------

    @event("Adopted")
    def _adopted(self, workflow_version: int, entries: dict[str, dict[str, Any]]) -> None:
        self.workflow_version = workflow_version
        self.entries = entries

    @event("Fired")
    def _fired(self, schedule: str, through: str, due_times: list[str]) -> None:
        # `through` may lie past the fired times: the due times a catch-up policy skipped.
        self.entries[schedule]["last_due"] = through


def due_times(schedule: Schedule, after: dt.datetime, until: dt.datetime, limit: int) -> list[dt.datetime]:
    """The latest `limit` due times in (after, until], oldest first, in UTC."""
    interval = schedule.interval
    found: list[dt.datetime] = []
    if interval is not None:
        last = _EPOCH + (until - _EPOCH) // interval * interval
        while last > after and len(found) < limit:
            found.append(last)
            last -= interval
        return found[::-1]
    for moment in _cron_times(schedule, until + dt.timedelta(seconds=1), backwards=True):
        if moment <= after or len(found) == limit:
            break
        if moment <= until:
            found.append(moment)
    return found[::-1]


def next_due_time(schedule: Schedule, after: dt.datetime) -> dt.datetime:
    """The first due time strictly after `after`, in UTC."""
    interval = schedule.interval
    if interval is not None:
        return _EPOCH + ((after - _EPOCH) // interval + 1) * interval
    for moment in _cron_times(schedule, after, backwards=False):
        if moment > after:
            return moment
    raise ValueError(f"cron expression {schedule.cron!r} has no due time after {after.isoformat()}")


def _cron_times(schedule: Schedule, start: dt.datetime, backwards: bool) -> Iterator[dt.datetime]:
    """The instants of the cron expression's wall times from `start`, each once, strictly monotonic.

    croniter walks naive wall times (its own time zone arithmetic is wrong around changes);
    each becomes an instant with fold=0: the first of a repeated time, a skipped time shifted by
    the gap. A shifted time can land on an instant already produced: it is dropped.
    """
    zone = schedule.zone
    wall = start.astimezone(zone).replace(tzinfo=None)
    steps = croniter(schedule.cron, wall)
    step = steps.get_prev if backwards else steps.get_next
    previous: dt.datetime | None = None
    for _ in range(_SCAN_LIMIT):
        moment = step(dt.datetime).replace(tzinfo=zone).astimezone(dt.UTC)
        if previous is None or (moment < previous if backwards else moment > previous):
            previous = moment
            yield moment
