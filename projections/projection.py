"""Run events -> rows of the projections' tables, written once each however often they arrive.

Exactly once comes from the run's version: events of a run arrive in order (one partition per
run), so an event at or below the highest version already in the audit table is a redelivery
and is dropped before anything is written, the rollups' views included. The highest version
per run is cached; for a run not in the cache it is read back from `events`, with the run's
state from `runs` and `node_attempts`.

Each batch writes `runs` and `node_attempts` first and `events` last. Those two are
ReplacingMergeTrees keyed by run (and attempt), so writing them again changes nothing; the
audit is what says an event is done, so a batch interrupted anywhere is simply done again.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.insert import InsertContext

from projections.schema import EVENTS, NODE_ATTEMPTS, RUNS
from schemas.envelope import Envelope

EVENT_COLUMNS = (
    "tenant",
    "run_id",
    "version",
    "event_id",
    "type",
    "time",
    "workflow",
    "node_id",
    "node_type",
    "attempt",
    "duration_ms",
    "error_class",
    "payload",
)
RUN_COLUMNS = (
    "tenant",
    "run_id",
    "workflow",
    "workflow_version",
    "status",
    "started_at",
    "finished_at",
    "duration_ms",
    "error",
    "node_types",
    "version",
    "updated_at",
)
ATTEMPT_COLUMNS = (
    "tenant",
    "run_id",
    "node_id",
    "attempt",
    "attempt_id",
    "workflow",
    "node_type",
    "status",
    "scheduled_at",
    "started_at",
    "finished_at",
    "duration_ms",
    "wall_ms",
    "error_class",
    "version",
)
TERMINAL = {"Completed": "completed", "Failed": "failed", "Cancelled": "cancelled"}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass
class RunState:
    """What the projection knows of one run: enough to write its next rows."""

    tenant: str
    run_id: str
    version: int = 0  # the highest version in the audit table
    workflow: str = ""
    workflow_version: int = 0
    status: str = "unknown"
    started_at: dt.datetime = _EPOCH
    finished_at: dt.datetime | None = None
    duration_ms: float | None = None
    error: str = ""
    node_types: dict[str, str] = field(default_factory=dict)
    updated_at: dt.datetime = _EPOCH
    attempts: dict[tuple[str, int], list[Any]] = field(default_factory=dict)  # rows by (node, attempt)
    attempt_keys: dict[str, tuple[str, int]] = field(default_factory=dict)  # attempt id -> key

    def row(self) -> list[Any]:
        return [
            self.tenant,
            self.run_id,
            self.workflow,
            self.workflow_version,
            self.status,
            self.started_at,
            self.finished_at,
            self.duration_ms,
            self.error,
            self.node_types,
            self.version,
            self.updated_at,
        ]


# Indexes into an attempt row (ATTEMPT_COLUMNS).
_A_STATUS, _A_SCHEDULED, _A_STARTED, _A_FINISHED = 7, 8, 9, 10
_A_DURATION, _A_WALL, _A_ERROR, _A_VERSION = 11, 12, 13, 14


class Projection:
    """Writes batches of run events into one set of tables (`suffix` names a rebuild's set).

    `fresh` says the tables started empty and every run's events come from its first: no run
    needs reading back (a rebuild). Synchronous: call it from one thread at a time.
    """

    def __init__(self, client: Client, suffix: str = "", fresh: bool = False, cache_size: int = 50_000):
        self.client = client
        self.fresh = fresh
        self.events_table = EVENTS + suffix
        self.runs_table = RUNS + suffix
        self.attempts_table = NODE_ATTEMPTS + suffix
        self._runs: OrderedDict[str, RunState] = OrderedDict()
        self._cache_size = cache_size
        self._insert_contexts: dict[str, InsertContext] = {}
        self.duplicates = 0

    def write(self, envelopes: Sequence[Envelope]) -> int:
        """Project a batch; return how many events were new (the rest were redeliveries)."""
        states = self._states(envelopes)
        events: list[list[Any]] = []
        touched: dict[str, RunState] = {}
        attempts: dict[tuple[str, str, int], list[Any]] = {}
        try:
            for envelope in envelopes:
                version = envelope.version or 0
                state = states[envelope.run_id]
                if version <= state.version:
                    self.duplicates += 1
                    continue
                events.append(_apply(state, envelope, attempts))
                touched[envelope.run_id] = state
            if events:
                # Idempotent tables first, the audit (the record of what is done) last.
                self._insert(self.runs_table, [s.row() for s in touched.values()], RUN_COLUMNS)
                self._insert(self.attempts_table, list(attempts.values()), ATTEMPT_COLUMNS)
                self._insert(self.events_table, events, EVENT_COLUMNS)
        except BaseException:
            # The cached states are ahead of what was written: read them back next time.
            for run_id in states:
                self._runs.pop(run_id, None)
            raise
        self._remember(touched)
        return len(events)

    def forget(self) -> None:
        """Drop every cached run (another writer may have changed the tables), and what it knows
        of the tables (a rebuild swapped them)."""
        self._runs.clear()
        self._insert_contexts.clear()

    # ---- run states --------------------------------------------------------

    def _states(self, envelopes: Sequence[Envelope]) -> dict[str, RunState]:
        states: dict[str, RunState] = {}
        missing: dict[str, str] = {}
        starting: set[str] = set()  # runs whose first event here is their first
        for envelope in envelopes:
            run_id = envelope.run_id
            if run_id in states:
                continue
            cached = self._runs.get(run_id)
            if cached is not None:
                states[run_id] = cached
            elif self.fresh:
                states[run_id] = self._runs[run_id] = RunState(envelope.tenant, run_id)
            else:
                missing[run_id] = envelope.tenant
                if envelope.version == 1:
                    starting.add(run_id)
        if missing:
            states.update(self._read_back(missing, starting))
        return states

    def _read_back(self, runs: dict[str, str], starting: set[str]) -> dict[str, RunState]:
        """The states of runs this projection has not seen since it started, from the tables."""
        states = {run_id: RunState(tenant, run_id) for run_id, tenant in runs.items()}
        parameters = {"runs": list(runs), "tenants": sorted(set(runs.values()))}
        where = "WHERE tenant IN {tenants:Array(String)} AND run_id IN {runs:Array(String)}"
        versions = self.client.query(
            f"SELECT run_id, max(version) FROM {self.events_table} {where} GROUP BY run_id",
            parameters=parameters,
        ).result_rows
        for run_id, version in versions:
            states[run_id].version = version
        # A run that starts in this batch and has no audit row yet has nothing else worth reading:
        # a batch writes the audit last, so whatever else it wrote of the run is written again.
        known = {run_id for run_id, _ in versions}
        needed = {r: t for r, t in runs.items() if r in known or r not in starting}
        if not needed:
            return states
        parameters = {"runs": list(needed), "tenants": sorted(set(needed.values()))}
        columns = ", ".join(RUN_COLUMNS)
        for row in self.client.query(
            f"SELECT {columns} FROM {self.runs_table} FINAL {where}", parameters=parameters
        ).result_rows:
            state = states[row[1]]
            (state.workflow, state.workflow_version, state.status) = row[2:5]
            state.started_at, state.finished_at = _utc(row[5]), _utc(row[6])
            state.duration_ms, state.error, state.node_types = row[7], row[8], dict(row[9])
            state.updated_at = _utc(row[11])
        columns = ", ".join(ATTEMPT_COLUMNS)
        for row in self.client.query(
            f"SELECT {columns} FROM {self.attempts_table} FINAL {where}", parameters=parameters
        ).result_rows:
            attempt = list(row)
            for index in (_A_SCHEDULED, _A_STARTED, _A_FINISHED):
                attempt[index] = _utc(attempt[index])
            key = (attempt[2], attempt[3])
            states[attempt[1]].attempts[key] = attempt
            states[attempt[1]].attempt_keys[attempt[4]] = key
        return states

    def _remember(self, touched: dict[str, RunState]) -> None:
        runs = self._runs
        for run_id, state in touched.items():
            runs[run_id] = state
            runs.move_to_end(run_id)
        while len(runs) > self._cache_size:
            runs.popitem(last=False)

    def _insert(self, table: str, rows: list[list[Any]], columns: tuple[str, ...]) -> None:
        if not rows:
            return
        # A context per table keeps its column types, which the client would otherwise ask the
        # server for on every insert (one more round trip per table per batch).
        context = self._insert_contexts.get(table)
        if context is None:
            context = self.client.create_insert_context(table, list(columns))
            self._insert_contexts[table] = context
        self.client.insert(data=rows, context=context)


def _apply(state: RunState, envelope: Envelope, attempts: dict[tuple[str, str, int], list[Any]]) -> list[Any]:
    """Advance a run's state by one event; record the attempt rows it changed; return its audit row."""
    kind, payload, time = envelope.type, envelope.payload, envelope.time
    version = envelope.version or 0
    state.version, state.updated_at = version, time
    node_id = payload.get("node_id")
    node_id = node_id if isinstance(node_id, str) else ""
    attempt_row: list[Any] | None = None
    duration = 0.0
    if kind == "Started":
        state.workflow = str(payload.get("workflow", ""))
        state.workflow_version = int(payload.get("workflow_version") or 0)
        state.status, state.started_at = "running", time
        nodes = (payload.get("definition") or {}).get("nodes") or []
        state.node_types = {str(n.get("id")): str(n.get("type")) for n in nodes if isinstance(n, dict)}
    elif kind == "NodeScheduled":
        attempt = int(payload.get("attempt") or 1)
        node_type = str(payload.get("node_type") or state.node_types.get(node_id, ""))
        state.node_types.setdefault(node_id, node_type)
        key = (node_id, attempt)
        attempt_id = str(payload.get("attempt_id") or "")
        attempt_row = [
            state.tenant, state.run_id, node_id, attempt, attempt_id, state.workflow, node_type,
            "scheduled", time, None, None, None, None, "", version,
        ]  # fmt: skip
        state.attempts[key] = attempt_row
        state.attempt_keys[attempt_id] = key
    elif kind in ("AttemptStarted", "NodeSucceeded", "NodeFailed"):
        attempt_row = _attempt(state, payload)
        if attempt_row is not None:
            if kind == "AttemptStarted":
                attempt_row[_A_STATUS], attempt_row[_A_STARTED] = "running", time
            else:
                duration = float(payload.get("duration_ms") or 0.0)
                attempt_row[_A_STATUS] = "succeeded" if kind == "NodeSucceeded" else "failed"
                attempt_row[_A_FINISHED], attempt_row[_A_DURATION] = time, duration
                scheduled = attempt_row[_A_SCHEDULED]
                if scheduled is not None:
                    attempt_row[_A_WALL] = (time - scheduled).total_seconds() * 1000
                attempt_row[_A_ERROR] = str(payload.get("error_class") or "")
    elif kind == "NodeSkipped":
        attempt_row = [
            state.tenant, state.run_id, node_id, 0, "", state.workflow, state.node_types.get(node_id, ""),
            "skipped", None, None, time, None, None, "", version,
        ]  # fmt: skip
        state.attempts[(node_id, 0)] = attempt_row
    elif kind in TERMINAL:
        state.status, state.finished_at = TERMINAL[kind], time
        duration = state.duration_ms = (time - state.started_at).total_seconds() * 1000
        state.error = str(payload.get("reason") or "")
    # Any other type (one this projector does not know yet included) is audited as it is.
    if attempt_row is not None:
        attempt_row[_A_VERSION] = version
        attempts[(state.run_id, attempt_row[2], attempt_row[3])] = attempt_row
    return [
        state.tenant,
        state.run_id,
        version,
        envelope.id,
        kind,
        time,
        state.workflow,
        node_id,
        attempt_row[6] if attempt_row is not None else state.node_types.get(node_id, ""),
        attempt_row[3] if attempt_row is not None else 0,
        duration,
        str(payload.get("error_class") or ""),
        orjson.dumps(payload, option=orjson.OPT_SORT_KEYS | orjson.OPT_UTC_Z).decode(),
    ]


def _attempt(state: RunState, payload: dict[str, Any]) -> list[Any] | None:
    key = state.attempt_keys.get(str(payload.get("attempt_id") or ""))
    return state.attempts.get(key) if key is not None else None


def _utc(value: Any) -> Any:
    # ClickHouse hands back UTC times without a zone.
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value
