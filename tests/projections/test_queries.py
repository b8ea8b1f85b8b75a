"""The analytics queries give the right figures on a known data set, and bind what callers pass."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from projections.projection import Projection
from projections.queries import Analytics
from tests.projections.conftest import fresh_database
from tests.projections.support import T0, Attempt, run_history

DAY = (T0 - dt.timedelta(hours=1), T0 + dt.timedelta(hours=1))


@pytest.fixture(scope="module")
def analytics(chdb_url: str) -> Iterator[Analytics]:
    """acme: 4 `orders` runs (3 completed, 1 failed) and 1 `billing` run cancelled; globex: 1 run.

    orders runs start at minute 0, 0, 1, 1; python durations 10, 20, ..., 80 ms; the failed
    run's second node failed with ValueError, one python attempt with TimeoutError.
    """
    histories = []
    durations = iter(range(10, 90, 10))
    for i in range(4):
        start = T0 + dt.timedelta(minutes=i // 2, seconds=i)
        failed = i == 3
        attempts = [
            Attempt("load", "python", "failed", float(next(durations)), "TimeoutError")
            if i == 1
            else Attempt("load", "python", "succeeded", float(next(durations))),
            Attempt("save", "python", "failed" if failed else "succeeded", float(next(durations)),
                    "ValueError" if failed else ""),
            Attempt("tidy", "transform", "skipped"),
        ]  # fmt: skip
        histories.append(
            run_history("orders", attempts, end="Failed" if failed else "Completed", start=start)
        )
    histories.append(
        run_history("billing", [Attempt("ask", "approval", "succeeded", 5.0)], end="Cancelled", start=T0)
    )
    histories.append(run_history("orders", [Attempt("load", "python", "succeeded", 999.0)], tenant="globex"))
    with fresh_database(chdb_url) as db:
        Projection(db.client).write([e for events in histories for e in events])
        yield Analytics(db.client)


def test_runs_and_node_executions_per_minute(analytics: Analytics) -> None:
    runs = analytics.runs_per_minute("acme", *DAY)
    assert [(r["minute"].minute, r["workflow"], r["started"]) for r in runs] == [
        (0, "billing", 1),
        (0, "orders", 2),
        (1, "orders", 2),
    ]
    nodes = analytics.node_executions_per_minute("acme", *DAY)
    assert sum(r["executions"] for r in nodes if r["node_type"] == "python") == 8
    assert sum(r["failures"] for r in nodes) == 2
    assert {r["node_type"] for r in nodes} == {"python", "approval"}  # skipped nodes never executed


def test_failure_rates_per_workflow_and_node_type(analytics: Analytics) -> None:
    workflows = {r["workflow"]: (r["finished"], r["failed"], r["failure_rate"]) for r in
                 analytics.workflow_failure_rates("acme", *DAY)}  # fmt: skip
    assert workflows == {"orders": (4, 1, 0.25), "billing": (1, 0, 0.0)}
    types = {(r["workflow"], r["node_type"]): r["failure_rate"] for r in
             analytics.node_type_failure_rates("acme", *DAY)}  # fmt: skip
    assert types == {("orders", "python"): 0.25, ("billing", "approval"): 0.0}


def test_duration_percentiles(analytics: Analytics) -> None:
    python = next(r for r in analytics.node_durations("acme", *DAY) if r["node_type"] == "python")
    assert python["executions"] == 8
    # Eight values 10..80 ms: ClickHouse's interpolated quantiles.
    assert python["p50_ms"] == pytest.approx(45.0)
    assert python["p95_ms"] == pytest.approx(76.5)
    assert python["p99_ms"] == pytest.approx(79.3)
    orders = next(r for r in analytics.run_durations("acme", *DAY) if r["workflow"] == "orders")
    # An orders run ends 6 events after it starts (2 per executed node, a skip, the end), 1 s apart.
    assert orders["finished"] == 4 and orders["p50_ms"] == pytest.approx(6000.0)


def test_slowest_nodes_and_top_error_classes(analytics: Analytics) -> None:
    slowest = analytics.slowest_nodes("acme", *DAY, limit=3)
    assert [r["duration_ms"] for r in slowest] == [80.0, 70.0, 60.0]
    assert slowest[0]["node_id"] == "save" and slowest[0]["status"] == "failed"
    errors = analytics.top_error_classes("acme", *DAY)
    assert [(r["error_class"], r["failures"], r["runs"]) for r in errors] == [
        ("TimeoutError", 1, 1),
        ("ValueError", 1, 1),
    ]


def test_runs_by_status_and_a_run_timeline(analytics: Analytics) -> None:
    assert {r["status"]: r["runs"] for r in analytics.runs_by_status("acme", *DAY)} == {
        "cancelled": 1,
        "completed": 3,
        "failed": 1,
    }
    globex = analytics.runs_by_status("globex", *DAY)
    assert globex == [{"status": "completed", "runs": 1}]
    run_id = analytics.client.query("SELECT run_id FROM runs WHERE tenant = 'globex'").result_rows[0][0]
    timeline = analytics.run_timeline("globex", run_id)
    assert [e["type"] for e in timeline] == ["Started", "NodeScheduled", "NodeSucceeded", "Completed"]
    assert timeline[2]["duration_ms"] == 999.0
    assert analytics.run_timeline("acme", run_id) == []  # another tenant's run is not visible


@pytest.mark.parametrize(
    "hostile",
    [
        "acme' OR '1'='1",
        "acme' --",
        "acme'; DROP TABLE events; --",
        "x\\' OR 1=1 --",
        "{tenant:String}",
        "acme\x00",
    ],
)
def test_hostile_values_are_bound_not_injected(analytics: Analytics, hostile: str) -> None:
    assert analytics.runs_by_status(hostile, *DAY) == []
    assert analytics.run_timeline(hostile, hostile) == []
    assert analytics.slowest_nodes(hostile, *DAY, limit=5) == []
    assert analytics.top_error_classes(hostile, *DAY) == []
    # Nothing was dropped or changed: acme's figures are intact.
    assert sum(r["runs"] for r in analytics.runs_by_status("acme", *DAY)) == 5


def test_a_limit_that_is_not_a_number_is_refused(analytics: Analytics) -> None:
    with pytest.raises(Exception, match=r"(?i)cannot|parse|type|convert|value"):
        analytics.slowest_nodes("acme", *DAY, limit="1; DROP TABLE events")  # type: ignore[arg-type]
    assert len(analytics.slowest_nodes("acme", *DAY, limit=100)) == 9


def test_times_without_a_zone_are_refused(analytics: Analytics) -> None:
    with pytest.raises(ValueError, match="no time zone"):
        analytics.runs_by_status("acme", T0.replace(tzinfo=None), T0)
