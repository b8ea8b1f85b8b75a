"""The projections' ClickHouse tables, and the versioned migrations that create and change them.

Migrations are applied in order on start and recorded in `schema_migrations`; each statement
is idempotent (IF NOT EXISTS), so a start that dies half-way simply applies the rest next time.
A new migration is appended, never edited: version N is the same everywhere it ran.

events          the audit: every run event once, ordered by (tenant, run, version), monthly parts
runs            the latest state per run (ReplacingMergeTree on the run's version)
node_attempts   one row per node attempt (and per skipped node) with status, durations, error class
workflow_minute per minute and workflow: runs started/completed/failed/cancelled, run durations
node_minute     per minute, workflow and node type: executions, failures, durations
The two rollups are AggregatingMergeTrees fed by materialized views on `events`, so they count
exactly what the audit holds: an event deduplicated before the audit is never counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from clickhouse_connect.driver.client import Client

EVENTS, RUNS, NODE_ATTEMPTS = "events", "runs", "node_attempts"
WORKFLOW_MINUTE, NODE_MINUTE = "workflow_minute", "node_minute"
# Base tables are written by the projector; rollups are derived from `events` by their view.
BASE_TABLES = (EVENTS, RUNS, NODE_ATTEMPTS)
ROLLUPS = {WORKFLOW_MINUTE: "workflow_minute_mv", NODE_MINUTE: "node_minute_mv"}
TABLES = (*BASE_TABLES, *ROLLUPS)

TERMINAL_TYPES = ("Completed", "Failed", "Cancelled")
# Deterministic quantiles: a state built live batch by batch equals one built in a single rebuild.
LEVELS = "0.5, 0.95, 0.99"
QUANTILES = f"quantilesDeterministic({LEVELS})"

# What each rollup's view computes from a block of `events` rows. The rebuild runs the same
# SELECT over a whole rebuilt audit table, so the two ways of filling a rollup cannot drift.
ROLLUP_SELECT = {
    WORKFLOW_MINUTE: f"""
        SELECT tenant, workflow, toStartOfMinute(time) AS minute,
               countIf(type = 'Started') AS started,
               countIf(type = 'Completed') AS completed,
               countIf(type = 'Failed') AS failed,
               countIf(type = 'Cancelled') AS cancelled,
               quantilesDeterministicStateIf({LEVELS})(
                   duration_ms, cityHash64(event_id), type IN {TERMINAL_TYPES}) AS duration_ms
        FROM {{source}}
        WHERE type IN ('Started', {", ".join(f"'{t}'" for t in TERMINAL_TYPES)})
        GROUP BY tenant, workflow, minute""",
    NODE_MINUTE: f"""
        SELECT tenant, workflow, node_type, toStartOfMinute(time) AS minute,
               count() AS executions,
               countIf(type = 'NodeFailed') AS failures,
               quantilesDeterministicState({LEVELS})(duration_ms, cityHash64(event_id)) AS duration_ms
        FROM {{source}}
        WHERE type IN ('NodeSucceeded', 'NodeFailed')
        GROUP BY tenant, workflow, node_type, minute""",
}

TIME = "DateTime64(6, 'UTC')"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "audit, runs, node attempts, per-minute rollups",
        (
            f"""CREATE TABLE IF NOT EXISTS {EVENTS} (
                tenant LowCardinality(String),
                run_id String,
                version UInt64,
                event_id String,
                type LowCardinality(String),
                time {TIME},
                workflow LowCardinality(String),
                node_id String,
                node_type LowCardinality(String),
                attempt UInt32,
                duration_ms Float64,
                error_class LowCardinality(String),
                payload String CODEC(ZSTD(3))
            ) ENGINE = MergeTree
            PARTITION BY toYYYYMM(time)
            ORDER BY (tenant, run_id, version)""",
            f"""CREATE TABLE IF NOT EXISTS {RUNS} (
                tenant LowCardinality(String),
                run_id String,
                workflow LowCardinality(String),
                workflow_version UInt32,
                status LowCardinality(String),
                started_at {TIME},
                finished_at Nullable({TIME}),
                duration_ms Nullable(Float64),
                error String,
                node_types Map(String, String),
                version UInt64,
                updated_at {TIME}
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY (tenant, run_id)""",
            f"""CREATE TABLE IF NOT EXISTS {NODE_ATTEMPTS} (
                tenant LowCardinality(String),
                run_id String,
                node_id String,
                attempt UInt32,
                attempt_id String,
                workflow LowCardinality(String),
                node_type LowCardinality(String),
                status LowCardinality(String),
                scheduled_at Nullable({TIME}),
                started_at Nullable({TIME}),
                finished_at Nullable({TIME}),
                duration_ms Nullable(Float64),
                wall_ms Nullable(Float64),
                error_class LowCardinality(String),
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY (tenant, run_id, node_id, attempt)""",
            f"""CREATE TABLE IF NOT EXISTS {WORKFLOW_MINUTE} (
                tenant LowCardinality(String),
                workflow LowCardinality(String),
                minute DateTime('UTC'),
                started SimpleAggregateFunction(sum, UInt64),
                completed SimpleAggregateFunction(sum, UInt64),
                failed SimpleAggregateFunction(sum, UInt64),
                cancelled SimpleAggregateFunction(sum, UInt64),
                duration_ms AggregateFunction({QUANTILES}, Float64, UInt64)
            ) ENGINE = AggregatingMergeTree
            PARTITION BY toYYYYMM(minute)
            ORDER BY (tenant, workflow, minute)""",
            f"""CREATE TABLE IF NOT EXISTS {NODE_MINUTE} (
                tenant LowCardinality(String),
                workflow LowCardinality(String),
                node_type LowCardinality(String),
                minute DateTime('UTC'),
                executions SimpleAggregateFunction(sum, UInt64),
                failures SimpleAggregateFunction(sum, UInt64),
                duration_ms AggregateFunction({QUANTILES}, Float64, UInt64)
            ) ENGINE = AggregatingMergeTree
            PARTITION BY toYYYYMM(minute)
            ORDER BY (tenant, workflow, node_type, minute)""",
            *(
                f"CREATE MATERIALIZED VIEW IF NOT EXISTS {view} TO {rollup} AS "
                + ROLLUP_SELECT[rollup].format(source=EVENTS)
                for rollup, view in ROLLUPS.items()
            ),
        ),
    ),
)


def migrate(client: Client, retention_days: int = 0) -> list[int]:
    """Apply the migrations this database lacks, then the audit retention; return what was applied."""
    client.command(
        f"""CREATE TABLE IF NOT EXISTS schema_migrations (
            version UInt32, name String, applied_at {TIME} DEFAULT now64(6)
        ) ENGINE = MergeTree ORDER BY version"""
    )
    done = {row[0] for row in client.query("SELECT version FROM schema_migrations").result_rows}
    applied = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        for statement in migration.statements:
            client.command(statement)
        client.insert(
            "schema_migrations", [[migration.version, migration.name]], column_names=["version", "name"]
        )
        applied.append(migration.version)
    apply_retention(client, retention_days)
    return applied


def apply_retention(client: Client, days: int) -> None:
    """Keep audit rows `days` days (0: forever). Changed only when it differs: a TTL change
    rewrites parts."""
    if not isinstance(days, int) or days < 0:
        raise ValueError(f"audit retention must be a whole number of days >= 0, got {days!r}")
    engine = client.query(
        "SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
        parameters={"t": EVENTS},
    ).result_rows[0][0]
    wanted = f"toIntervalDay({days})" if days else None
    current = "TTL " in engine
    if wanted is None and current:
        client.command(f"ALTER TABLE {EVENTS} REMOVE TTL")
    elif wanted is not None and wanted not in engine:
        client.command(f"ALTER TABLE {EVENTS} MODIFY TTL toDateTime(time) + {wanted}")
