"""A workflow's timetable fires each due time of its schedules once, at the time the clock says,
under the declared catch-up policy, in the declared time zone, across versions and workers."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from eventsourcing.persistence import IntegrityError

from aggregates.schedule import Timetable, scheduled_run_id
from aggregates.store import RunStore
from schemas.definition import DefinitionInvalid, WorkflowDefinition, parse_definition
from tests.aggregates.support import transform, workflow

T0 = dt.datetime(2030, 1, 1, 12, 0, 30, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).astimezone(dt.UTC)


def nightly(*schedules: dict[str, Any], version: int = 1) -> WorkflowDefinition:
    return parse_definition(
        workflow(transform("t", "input"), name="nightly", version=version, schedules=list(schedules))
    )


def timetable(*schedules: dict[str, Any], since: dt.datetime = T0) -> Timetable:
    table = Timetable(workflow="acme.nightly", tenant="acme")
    table.adopt(nightly(*schedules), since)
    return table


def fired(table: Timetable, now: dt.datetime) -> list[dt.datetime]:
    return [f.due_at for f in table.fire(now)]


def test_an_interval_fires_each_due_time_once_counting_from_the_epoch() -> None:
    table = timetable({"every": "15s"})
    assert fired(table, at(14)) == []  # due times fall on :00, :15, :30, :45 of each minute
    assert fired(table, at(15)) == [at(15)]
    assert fired(table, at(15)) == []
    assert fired(table, at(29.9)) == []
    assert fired(table, at(30)) == [at(30)]
    assert table.next_due() == at(45)


def test_each_due_time_has_its_own_run_id_the_same_for_anyone_who_fires_it() -> None:
    first, second = timetable({"every": 10}), timetable({"every": 10})
    (a,) = first.fire(at(10))
    (b,) = second.fire(at(10))
    assert a.run_id == b.run_id == scheduled_run_id("acme", "acme.nightly", "0", at(10))
    (later,) = first.fire(at(20))
    assert later.run_id != a.run_id


def test_skip_starts_nothing_for_due_times_missed_while_no_engine_ran() -> None:
    table = timetable({"every": "10m", "catch_up": "skip"})
    assert fired(table, at(3800)) == []  # 13:03:50: the latest due time, 13:00, is long past
    assert fired(table, at(4170)) == [utc("2030-01-01T13:10:00+00:00")]  # on time again


def test_skip_still_fires_a_due_time_late_by_less_than_the_grace() -> None:
    table = timetable({"every": "1m", "catch_up": "skip"})
    assert fired(table, at(29.5 + 40)) == [utc("2030-01-01T12:01:00+00:00")]


def test_once_starts_one_run_for_the_latest_missed_due_time() -> None:
    table = timetable({"every": "1m", "catch_up": "once"})
    assert fired(table, at(3600)) == [utc("2030-01-01T13:00:00+00:00")]
    assert fired(table, at(3600)) == []


def test_all_starts_a_run_for_each_missed_due_time_up_to_the_bound() -> None:
    table = timetable({"every": "1m", "catch_up": "all", "max_catch_up": 5})
    assert fired(table, at(140)) == [utc("2030-01-01T12:01:00+00:00"), utc("2030-01-01T12:02:00+00:00")]
    missed = fired(table, at(3600))
    assert missed == [utc(f"2030-01-01T12:{m}:00+00:00") for m in (56, 57, 58, 59)] + [
        utc("2030-01-01T13:00:00+00:00")
    ]  # the latest five; the 53 before them are skipped
    assert fired(table, at(3600)) == []


def test_a_cron_expression_is_read_in_its_time_zone() -> None:
    table = timetable({"cron": "0 9 * * 1-5", "timezone": "America/New_York", "catch_up": "all"})
    # 2030-01-01 is a Tuesday; 09:00 in New York in January is 14:00 UTC.
    assert table.next_due() == utc("2030-01-01T14:00:00+00:00")
    week = fired(table, utc("2030-01-08T00:00:00+00:00"))
    assert [d.isoformat() for d in week] == [
        f"2030-01-0{day}T14:00:00+00:00" for day in (1, 2, 3, 4, 7)
    ]  # Saturday 5th and Sunday 6th are not weekdays


def test_daily_cron_across_both_daylight_saving_changes_fires_once_a_day() -> None:
    # Europe/Berlin: clocks go forward at 02:00 on 2030-03-31 and back at 03:00 on 2030-10-27.
    spring = timetable(
        {"cron": "30 2 * * *", "timezone": "Europe/Berlin", "catch_up": "all"},
        since=utc("2030-03-29T12:00:00+00:00"),
    )
    days = fired(spring, utc("2030-04-02T00:00:00+00:00"))
    assert [d.isoformat() for d in days] == [
        "2030-03-30T01:30:00+00:00",  # 02:30 CET
        "2030-03-31T01:30:00+00:00",  # 02:30 does not exist: fires as the clocks jump, at 03:30 CEST
        "2030-04-01T00:30:00+00:00",  # 02:30 CEST
    ]
    autumn = timetable(
        {"cron": "30 2 * * *", "timezone": "Europe/Berlin", "catch_up": "all"},
        since=utc("2030-10-25T12:00:00+00:00"),
    )
    days = fired(autumn, utc("2030-10-29T00:00:00+00:00"))
    assert [d.isoformat() for d in days] == [
        "2030-10-26T00:30:00+00:00",  # 02:30 CEST
        "2030-10-27T00:30:00+00:00",  # 02:30 happens twice: the first, in CEST, only
        "2030-10-28T01:30:00+00:00",  # 02:30 CET
    ]


def test_a_half_hourly_cron_never_fires_the_same_instant_twice_around_a_change() -> None:
    table = timetable(
        {"cron": "*/30 * * * *", "timezone": "Europe/Berlin", "catch_up": "all"},
        since=utc("2030-03-30T23:40:00+00:00"),
    )
    night = fired(table, utc("2030-03-31T02:10:00+00:00"))
    assert [d.strftime("%H:%M") for d in night] == ["00:00", "00:30", "01:00", "01:30", "02:00"]
    assert fired(table, utc("2030-03-31T02:10:00+00:00")) == []
    ahead = timetable(
        {"cron": "*/30 * * * *", "timezone": "Europe/Berlin", "catch_up": "all"},
        since=utc("2030-03-30T23:40:00+00:00"),
    )
    steps = []
    while (due := ahead.next_due()) is not None and due <= utc("2030-03-31T02:10:00+00:00"):
        steps += fired(ahead, due)
    assert steps == night  # the same due times, whether fired one by one or caught up at once


def test_the_input_is_the_constant_object_with_expressions_over_the_due_time() -> None:
    table = timetable(
        {"name": "hourly", "every": "1h", "input": {"region": "eu"}, "inputs": {"day": "schedule.due_at"}}
    )
    (firing,) = table.fire(utc("2030-01-01T13:00:00+00:00"))
    assert firing.input == {"region": "eu", "day": "2030-01-01T13:00:00+00:00"}
    assert firing.schedule == "hourly"


def test_a_new_version_keeps_the_progress_of_unchanged_schedules_and_restarts_changed_ones() -> None:
    table = timetable({"name": "a", "every": 10}, {"name": "b", "every": 10})
    assert len(table.fire(at(10))) == 2
    changed = nightly({"name": "a", "every": 10, "input": {"v": 2}}, {"name": "b", "every": 20}, version=2)
    table.adopt(changed, at(12))
    assert fired(table, at(12)) == []  # a: fired 10 already; b: counts from the adoption at 12
    a20, a30, b30 = table.fire(at(30))
    assert (a20.schedule, a20.due_at, a20.input, a20.workflow_version) == ("a", at(20), {"v": 2}, 2)
    assert (a30.schedule, a30.due_at, b30.schedule, b30.due_at) == ("a", at(30), "b", at(30))


def test_a_version_without_schedules_stops_them() -> None:
    table = timetable({"every": 10})
    table.adopt(nightly(version=2), at(5))
    assert fired(table, at(100)) == [] and table.next_due() is None


def test_two_workers_firing_the_same_due_time_save_it_once(store: RunStore) -> None:
    store.deploy(nightly({"every": 10}))
    assert store.timetable("nightly", T0) is not None
    first = store.timetable("nightly", T0)
    assert first is not None
    store.save(first)
    mine, theirs = store.timetable("nightly", at(10)), store.timetable("nightly", at(10))
    assert mine is not None and theirs is not None
    assert [f.run_id for f in mine.fire(at(10))] == [f.run_id for f in theirs.fire(at(10))]
    store.save(mine)
    with pytest.raises(IntegrityError):
        store.save(theirs)  # the loser reloads and finds nothing due
    again = store.timetable("nightly", at(10))
    assert again is not None and again.fire(at(10)) == []


def test_a_workflow_without_schedules_has_no_timetable(store: RunStore) -> None:
    store.deploy(nightly())
    assert store.timetable("nightly", T0) is None
    assert store.timetable("never-deployed", T0) is None


@pytest.mark.parametrize(
    ("schedule", "location", "words"),
    [
        ({"cron": "0 25 * * *"}, "schedules[0].cron", "not a 5-field cron expression"),
        ({"cron": "* * * * * *"}, "schedules[0].cron", "not a 5-field cron expression"),
        ({"cron": "0 2 * * *", "timezone": "Europe/Atlantis"}, "schedules[0].timezone", "IANA"),
        ({"every": "soon"}, "schedules[0].every", "not an interval"),
        ({"every": 0.5}, "schedules[0].every", "between 1 second"),
        ({"cron": "* * * * *", "every": 5}, "schedules[0]", "exactly one of cron and every"),
        ({"every": 5, "inputs": {"x": "input.a"}}, "schedules[0].inputs", "may use only schedule"),
        ({"every": 5, "catch_up": "sometimes"}, "schedules[0].catch_up", "'skip', 'once' or 'all'"),
    ],
)
def test_a_bad_schedule_is_named_by_its_place_in_the_definition(
    schedule: dict[str, Any], location: str, words: str
) -> None:
    with pytest.raises(DefinitionInvalid) as caught:
        nightly(schedule)
    (problem,) = caught.value.problems
    assert problem.location == location
    assert words in problem.message
