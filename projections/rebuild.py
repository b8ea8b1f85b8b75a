"""Rebuilding every projection from a run-event history, and comparing projections table by table.

A rebuild fills fresh tables beside the live ones (`events__rebuild`, ...), then swaps each
with its live table in one atomic EXCHANGE: a query sees the old table or the new one, never
a half-built one. The rollups are filled by the same SELECT their materialized views run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from clickhouse_connect.driver.client import Client

from projections.projection import Projection
from projections.schema import (
    EVENTS,
    LEVELS,
    NODE_ATTEMPTS,
    NODE_MINUTE,
    ROLLUP_SELECT,
    ROLLUPS,
    RUNS,
    TABLES,
    WORKFLOW_MINUTE,
)
from schemas.envelope import Envelope

SUFFIX = "__rebuild"


def rebuild(
    client: Client,
    history: Iterable[Envelope],
    batch_size: int = 50_000,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Project `history` (every run event, in commit order) into fresh tables and swap them in.

    Returns the number of events projected. The live projector should be stopped meanwhile:
    what it writes during the rebuild lands in tables that are then swapped out.
    """
    for table in TABLES:
        client.command(f"DROP TABLE IF EXISTS {table}{SUFFIX}")
        client.command(f"CREATE TABLE {table}{SUFFIX} AS {table}")
    projection = Projection(client, suffix=SUFFIX, fresh=True)
    total = 0
    batch: list[Envelope] = []
    for envelope in history:
        batch.append(envelope)
        if len(batch) >= batch_size:
            total += projection.write(batch)
            batch = []
            if progress is not None:
                progress(total)
    if batch:
        total += projection.write(batch)
        if progress is not None:
            progress(total)
    for rollup in ROLLUPS:
        source = ROLLUP_SELECT[rollup].format(source=EVENTS + SUFFIX)
        client.command(f"INSERT INTO {rollup}{SUFFIX} {source}")
    for table in TABLES:
        client.command(f"EXCHANGE TABLES {table} AND {table}{SUFFIX}")
    for table in TABLES:
        client.command(f"DROP TABLE {table}{SUFFIX}")
    return total


# Each table's contents in a canonical order, merged as a reader sees them: replacing tables
# at their latest row, rollups with their states finalised.
_CONTENTS = {
    EVENTS: f"SELECT * FROM {EVENTS} ORDER BY tenant, run_id, version",
    RUNS: f"SELECT * FROM {RUNS} FINAL ORDER BY tenant, run_id",
    NODE_ATTEMPTS: f"SELECT * FROM {NODE_ATTEMPTS} FINAL ORDER BY tenant, run_id, node_id, attempt",
    WORKFLOW_MINUTE: f"""
        SELECT tenant, workflow, minute, sum(started), sum(completed), sum(failed), sum(cancelled),
               quantilesDeterministicMerge({LEVELS})(duration_ms)
        FROM {WORKFLOW_MINUTE} GROUP BY tenant, workflow, minute ORDER BY tenant, workflow, minute""",
    NODE_MINUTE: f"""
        SELECT tenant, workflow, node_type, minute, sum(executions), sum(failures),
               quantilesDeterministicMerge({LEVELS})(duration_ms)
        FROM {NODE_MINUTE} GROUP BY tenant, workflow, node_type, minute
        ORDER BY tenant, workflow, node_type, minute""",
}


def contents(client: Client) -> dict[str, list[tuple[Any, ...]]]:
    """Every projection table's rows, comparable with `==` between a live and a rebuilt set."""
    tables = {}
    for table, query in _CONTENTS.items():
        tables[table] = [tuple(row) for row in client.query(query).result_rows]
    return tables


def fingerprint(client: Client) -> dict[str, tuple[int, int]]:
    """Per table, (rows, a checksum of every row) as `contents` would list them: comparable
    between a live and a rebuilt set without reading millions of rows into Python."""
    prints = {}
    for table, query in _CONTENTS.items():
        row = client.query(f"SELECT count(), sum(cityHash64(*)) FROM ({query})").result_rows[0]
        prints[table] = (int(row[0]), int(row[1]))
    return prints
