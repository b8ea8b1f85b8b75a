"""Run events into the audit, runs and node attempts, once each however often they arrive."""

from __future__ import annotations

import datetime as dt

from projections.clickhouse import Connection
from projections.projection import Projection
from projections.rebuild import contents
from projections.schema import MIGRATIONS, migrate
from schemas.envelope import Envelope
from tests.projections.support import T0, Attempt, run_history

PIPELINE = [
    Attempt("fetch", "http", "failed", 120.0, "TimeoutError"),
    Attempt("fetch", "http", "succeeded", 80.0),
    Attempt("shape", "transform", "succeeded", 0.0),
    Attempt("notify", "python", "skipped"),
]


def scalar(db: Connection, query: str) -> object:
    return db.client.query(query).result_rows[0][0]


def test_a_run_fills_the_audit_its_latest_state_and_one_row_per_attempt(projections_db: Connection) -> None:
    events = run_history("orders", PIPELINE)
    assert Projection(projections_db.client).write(events) == len(events)
    tables = contents(projections_db.client)
    assert [(r[2], r[4]) for r in tables["events"]] == [(e.version, e.type) for e in events]
    (run,) = tables["runs"]
    assert run[2:5] == ("orders", 1, "completed")
    assert run[5] == T0.replace(tzinfo=None) and run[7] == (len(events) - 1) * 1000.0
    assert run[10] == len(events)
    attempts = {(r[2], r[3]): (r[6], r[7], r[11], r[13]) for r in tables["node_attempts"]}
    assert attempts == {
        ("fetch", 1): ("http", "failed", 120.0, "TimeoutError"),
        ("fetch", 2): ("http", "succeeded", 80.0, ""),
        ("shape", 1): ("transform", "succeeded", 0.0, ""),
        ("notify", 0): ("python", "skipped", None, ""),
    }
    # The wall time of an attempt runs from its scheduling to its result: one step here.
    assert {r[12] for r in tables["node_attempts"] if r[7] != "skipped"} == {1000.0}


def test_redelivered_events_are_dropped_before_anything_is_counted(projections_db: Connection) -> None:
    runs = [run_history("orders", PIPELINE) for _ in range(3)]
    first = Projection(projections_db.client)
    for events in runs:
        first.write(events[:5])
    # The projector dies before committing its position: a new one gets every event again, in
    # batches cut differently, some twice, and the rest for the first time.
    second = Projection(projections_db.client)
    for events in runs:
        second.write(events[:3])
        second.write(events[2:])
        second.write(events)
    assert second.duplicates == 3 * (3 + 3 + len(runs[0]))
    tables = contents(projections_db.client)
    assert len(tables["events"]) == sum(len(e) for e in runs)
    assert scalar(projections_db, "SELECT sum(started) FROM workflow_minute") == 3
    assert scalar(projections_db, "SELECT sum(completed) FROM workflow_minute") == 3
    assert scalar(projections_db, "SELECT sum(executions) FROM node_minute") == 3 * 3
    assert scalar(projections_db, "SELECT sum(failures) FROM node_minute") == 3


def test_events_of_types_it_does_not_know_are_audited_and_change_nothing_else(
    projections_db: Connection,
) -> None:
    events = run_history("orders", PIPELINE[:1], end="Failed")
    mystery = Envelope(
        id=f"{events[0].run_id}:99",
        type="MapItemCompleted",
        run_id=events[0].run_id,
        tenant="acme",
        time=T0 + dt.timedelta(minutes=5),
        version=len(events) + 1,
        payload={"node_id": 7, "items": [1, 2], "when": "later"},
    )
    Projection(projections_db.client).write([*events, mystery])
    tables = contents(projections_db.client)
    audited = tables["events"][-1]
    assert audited[4] == "MapItemCompleted" and audited[7] == ""
    assert audited[12] == '{"items":[1,2],"node_id":7,"when":"later"}'
    assert tables["runs"][0][4] == "failed"


def test_migrations_apply_once_and_record_their_versions(projections_db: Connection) -> None:
    assert migrate(projections_db.client) == []
    versions = projections_db.client.query("SELECT version FROM schema_migrations").result_rows
    assert [v for (v,) in versions] == [m.version for m in MIGRATIONS]


def test_audit_retention_follows_its_setting(projections_db: Connection) -> None:
    def engine() -> str:
        return str(
            scalar(
                projections_db,
                "SELECT engine_full FROM system.tables WHERE "
                "database = currentDatabase() AND name = 'events'",
            )
        )

    migrate(projections_db.client, retention_days=30)
    assert "TTL toDateTime(time) + toIntervalDay(30)" in engine()
    migrate(projections_db.client, retention_days=0)
    assert "TTL" not in engine()


def test_notification_attempts_after_a_run_ended_are_audited_and_leave_its_end_as_it_was(
    projections_db: Connection,
) -> None:
    events = run_history("orders", PIPELINE[2:3])
    run_id, ended = events[0].run_id, events[-1]
    delivery = f"{run_id}:notify:0"

    def later(kind: str, minutes: int, **payload: object) -> Envelope:
        version = len(events) + 1
        return Envelope(
            id=f"{run_id}:{version}",
            type=kind,
            run_id=run_id,
            tenant="acme",
            time=ended.time + dt.timedelta(minutes=minutes),
            version=version,
            payload=payload,
        )

    events.append(later("NotificationsScheduled", 0, deliveries={delivery: {"url": "https://x.test/"}}))
    attempt = {"delivery_id": delivery, "url": "https://x.test/", "attempt": 1, "status_code": 503}
    outcome = {"error": "HTTP 503", "outcome": "retrying", "next_attempt_at": "later", "outstanding": 1}
    events.append(later("NotificationAttempted", 1, **attempt, **outcome))
    Projection(projections_db.client).write(events)
    tables = contents(projections_db.client)
    audited = [r[4] for r in tables["events"][-3:]]
    assert audited == ["Completed", "NotificationsScheduled", "NotificationAttempted"]
    assert '"status_code":503' in tables["events"][-1][12]
    (run,) = tables["runs"]
    assert run[4] == "completed" and run[6] == ended.time.replace(tzinfo=None)
