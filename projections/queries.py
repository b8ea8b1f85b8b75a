"""The analytics queries the gateway and dashboards ask of the projections.

Every value a caller supplies travels as a bound parameter (`{name:Type}`, bound by
ClickHouse itself), never as SQL text: the SQL of each query is a constant. A query returns
plain dicts, one per row, with the column names as keys.

Every query is scoped to one tenant and, where it aggregates, to a time window
[since, until) of event times.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from clickhouse_connect.driver.client import Client

from projections.schema import EVENTS, LEVELS, NODE_ATTEMPTS, NODE_MINUTE, RUNS, WORKFLOW_MINUTE

_WINDOW = (
    "tenant = {tenant:String} AND minute >= {since:DateTime('UTC')} AND minute < {until:DateTime('UTC')}"
)
_EVENT_WINDOW = """tenant = {tenant:String}
    AND time >= {since:DateTime64(6, 'UTC')} AND time < {until:DateTime64(6, 'UTC')}"""

RUNS_PER_MINUTE = f"""
    SELECT minute, workflow, sum(started) AS started, sum(completed) AS completed,
           sum(failed) AS failed, sum(cancelled) AS cancelled
    FROM {WORKFLOW_MINUTE} WHERE {_WINDOW}
    GROUP BY minute, workflow ORDER BY minute, workflow"""

NODE_EXECUTIONS_PER_MINUTE = f"""
    SELECT minute, node_type, sum(executions) AS executions, sum(failures) AS failures
    FROM {NODE_MINUTE} WHERE {_WINDOW}
    GROUP BY minute, node_type ORDER BY minute, node_type"""

WORKFLOW_FAILURE_RATE = f"""
    SELECT workflow, finished, failed_runs AS failed, if(finished = 0, 0, failed / finished) AS failure_rate
    FROM (SELECT workflow, sum(completed + failed + cancelled) AS finished, sum(failed) AS failed_runs
          FROM {WORKFLOW_MINUTE} WHERE {_WINDOW} GROUP BY workflow)
    ORDER BY failure_rate DESC, workflow"""

NODE_TYPE_FAILURE_RATE = f"""
    SELECT workflow, node_type, executions, failures,
           if(executions = 0, 0, failures / executions) AS failure_rate
    FROM (SELECT workflow, node_type, sum(executions) AS executions, sum(failures) AS failures
          FROM {NODE_MINUTE} WHERE {_WINDOW} GROUP BY workflow, node_type)
    ORDER BY failure_rate DESC, workflow, node_type"""

NODE_DURATIONS = f"""
    SELECT workflow, node_type, sum(executions) AS executions,
           quantilesDeterministicMerge({LEVELS})(duration_ms) AS q,
           q[1] AS p50_ms, q[2] AS p95_ms, q[3] AS p99_ms
    FROM {NODE_MINUTE} WHERE {_WINDOW}
    GROUP BY workflow, node_type ORDER BY workflow, node_type"""

RUN_DURATIONS = f"""
    SELECT workflow, sum(completed + failed + cancelled) AS finished,
           quantilesDeterministicMerge({LEVELS})(duration_ms) AS q,
           q[1] AS p50_ms, q[2] AS p95_ms, q[3] AS p99_ms
    FROM {WORKFLOW_MINUTE} WHERE {_WINDOW}
    GROUP BY workflow ORDER BY workflow"""

SLOWEST_NODES = f"""
    SELECT run_id, workflow, node_id, node_type, attempt, status, duration_ms, finished_at
    FROM {NODE_ATTEMPTS} FINAL
    WHERE tenant = {{tenant:String}} AND finished_at >= {{since:DateTime64(6, 'UTC')}}
      AND finished_at < {{until:DateTime64(6, 'UTC')}} AND status IN ('succeeded', 'failed')
    ORDER BY duration_ms DESC, run_id, node_id, attempt LIMIT {{limit:UInt32}}"""

TOP_ERROR_CLASSES = f"""
    SELECT error_class, count() AS failures, uniqExact(run_id) AS runs,
           groupUniqArray(5)(node_type) AS node_types
    FROM {EVENTS} WHERE {_EVENT_WINDOW} AND type = 'NodeFailed'
    GROUP BY error_class ORDER BY failures DESC, error_class LIMIT {{limit:UInt32}}"""

RUNS_BY_STATUS = f"""
    SELECT status, count() AS runs FROM {RUNS} FINAL
    WHERE tenant = {{tenant:String}} AND started_at >= {{since:DateTime64(6, 'UTC')}}
      AND started_at < {{until:DateTime64(6, 'UTC')}}
    GROUP BY status ORDER BY status"""

# A page of runs, newest first, after the cursor (started_at, run_id) of the previous page.
RUNS_PAGE = f"""
    SELECT run_id, workflow, workflow_version, status, started_at, finished_at, duration_ms, error
    FROM {RUNS} FINAL
    WHERE tenant = {{tenant:String}}
      AND (empty({{workflows:Array(String)}}) OR has({{workflows:Array(String)}}, workflow))
      AND ({{status:String}} = '' OR status = {{status:String}})
      AND started_at >= {{since:DateTime64(6, 'UTC')}}
      AND (started_at, run_id) < ({{before_time:DateTime64(6, 'UTC')}}, {{before_run:String}})
    ORDER BY started_at DESC, run_id DESC LIMIT {{limit:UInt32}}"""

RUN_TIMELINE = f"""
    SELECT version, time, type, node_id, node_type, attempt, duration_ms, error_class, payload
    FROM {EVENTS} WHERE tenant = {{tenant:String}} AND run_id = {{run_id:String}}
    ORDER BY version"""


class Analytics:
    """The queries, on one connection to the projections."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def runs_per_minute(self, tenant: str, since: dt.datetime, until: dt.datetime) -> list[dict[str, Any]]:
        """Runs started and finished (by outcome) per minute and workflow."""
        return self._window(RUNS_PER_MINUTE, tenant, since, until)

    def node_executions_per_minute(
        self, tenant: str, since: dt.datetime, until: dt.datetime
    ) -> list[dict[str, Any]]:
        """Finished node attempts (and failed ones) per minute and node type."""
        return self._window(NODE_EXECUTIONS_PER_MINUTE, tenant, since, until)

    def workflow_failure_rates(
        self, tenant: str, since: dt.datetime, until: dt.datetime
    ) -> list[dict[str, Any]]:
        """Per workflow: finished runs, failed runs and their share."""
        return self._window(WORKFLOW_FAILURE_RATE, tenant, since, until)

    def node_type_failure_rates(
        self, tenant: str, since: dt.datetime, until: dt.datetime
    ) -> list[dict[str, Any]]:
        """Per workflow and node type: finished attempts, failed attempts and their share."""
        return self._window(NODE_TYPE_FAILURE_RATE, tenant, since, until)

    def node_durations(self, tenant: str, since: dt.datetime, until: dt.datetime) -> list[dict[str, Any]]:
        """p50/p95/p99 of node attempt durations (as the executor measured them) per node type."""
        return _without_q(self._window(NODE_DURATIONS, tenant, since, until))

    def run_durations(self, tenant: str, since: dt.datetime, until: dt.datetime) -> list[dict[str, Any]]:
        """p50/p95/p99 of run durations (start to end) per workflow."""
        return _without_q(self._window(RUN_DURATIONS, tenant, since, until))

    def slowest_nodes(
        self, tenant: str, since: dt.datetime, until: dt.datetime, limit: int = 10
    ) -> list[dict[str, Any]]:
        """The node attempts that took longest, slowest first."""
        return self._window(SLOWEST_NODES, tenant, since, until, limit=limit)

    def top_error_classes(
        self, tenant: str, since: dt.datetime, until: dt.datetime, limit: int = 10
    ) -> list[dict[str, Any]]:
        """The error classes of failed attempts, most frequent first."""
        return self._window(TOP_ERROR_CLASSES, tenant, since, until, limit=limit)

    def runs_by_status(self, tenant: str, since: dt.datetime, until: dt.datetime) -> list[dict[str, Any]]:
        """How many runs started in the window are in each status now."""
        return self._window(RUNS_BY_STATUS, tenant, since, until)

    def runs_page(
        self,
        tenant: str,
        workflows: list[str],
        status: str | None,
        since: dt.datetime | None,
        until: dt.datetime | None,
        before: tuple[dt.datetime, str] | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """Runs started in [since, until), of any of `workflows` (all when empty) and `status`
        (any when None), newest first, strictly after the `before` cursor (started_at, run_id)."""
        end = _utc(until) if until is not None else dt.datetime(2200, 1, 1, tzinfo=dt.UTC)
        before_time, before_run = before if before is not None else (end, "")
        if before is not None and _utc(before_time) >= end:
            before_time, before_run = end, ""
        parameters = {
            "tenant": tenant,
            "workflows": workflows,
            "status": status or "",
            "since": _utc(since) if since is not None else dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
            "before_time": _utc(before_time),
            "before_run": before_run,
            "limit": limit,
        }
        return self._rows(RUNS_PAGE, parameters)

    def run_timeline(self, tenant: str, run_id: str) -> list[dict[str, Any]]:
        """One run's events in order, as the audit holds them."""
        return self._rows(RUN_TIMELINE, {"tenant": tenant, "run_id": run_id})

    def _window(
        self, query: str, tenant: str, since: dt.datetime, until: dt.datetime, **more: Any
    ) -> list[dict[str, Any]]:
        return self._rows(query, {"tenant": tenant, "since": _utc(since), "until": _utc(until), **more})

    def _rows(self, query: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        result = self.client.query(query, parameters=parameters)
        return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]


def _without_q(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        row.pop("q", None)
    return rows


def _utc(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r} has no time zone; pass an aware datetime")
    return moment.astimezone(dt.UTC)
