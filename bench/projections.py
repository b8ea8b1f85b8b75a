"""replay, timetravel and lag (BENCHMARKS.md): rebuilding the projections, a run's state at any
version, and how soon a committed event is visible in ClickHouse."""

from __future__ import annotations

import datetime as dt
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eventsourcing.persistence import StoredEvent

from aggregates.store import RunStore
from bench.report import summary, write
from bench.workloads import _settings, five_node_definition, throughput
from citadel.runs import start_command
from citadel.stack import Stack
from projections.clickhouse import Connection
from projections.projection import Projection
from projections.rebuild import fingerprint, rebuild
from projections.schema import migrate
from schemas.definition import parse_definition
from schemas.envelope import Envelope
from streams.history import history

Progress = Callable[[str, int, int], None]


def _five_node_runs(store: RunStore, runs: int) -> list[str]:
    """Real runs of the five-node workflow, decided by the Run aggregate (17 events each)."""
    definition = five_node_definition()
    now = dt.datetime.now(dt.UTC)
    starts = [start_command(definition, {"n": i}, "bench") for i in range(runs)]
    store.decide(starts, now)
    for node in ("double", "label"):
        store.decide(
            [
                Envelope.new(
                    "NodeSucceeded",
                    c.run_id,
                    {"node_id": node, "attempt_id": f"{c.run_id}:{node}:1", "output": 7, "duration_ms": 2.5},
                )
                for c in starts
            ],
            now,
        )
    return [c.run_id for c in starts]


def _fill(store: RunStore, events: int, progress: Progress | None) -> int:
    """An event store of `events` run events: 200 real runs, then copies of them under new run ids."""
    template_ids = set(_five_node_runs(store, 200))
    template = [
        n
        for n in store.recorder.select_notifications(1, 100_000)
        if n.topic.startswith("aggregates.run:") and str(n.originator_id) in template_ids
    ]
    written = len(template)
    while written < events:
        batch: list[StoredEvent] = []
        while len(batch) < 20_000 and written + len(batch) < events:
            copies: dict[str, uuid.UUID] = {}
            for n in template:
                original = str(n.originator_id)
                new = copies.setdefault(original, uuid.uuid4())
                state = n.state.replace(original.encode(), str(new).encode())
                batch.append(StoredEvent(new, n.originator_version, n.topic, state))
        batch = batch[: events - written]
        store.recorder.insert_events(batch)
        written += len(batch)
        if progress:
            progress("filling the event store", written, events)
    return written


def replay(events: int = 1_000_000, progress: Progress | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="citadel-bench-") as home:
        store = RunStore(f"sqlite:///{home}/events.db")
        connection = Connection(f"chdb://{home}/clickhouse")
        try:
            migrate(connection.client)
            total = _fill(store, events, progress)
            # The live projection, as the projector writes it: batches of its default size.
            projection = Projection(connection.client)
            began, batch, done = time.perf_counter(), [], 0
            for envelope in history(store):
                batch.append(envelope)
                if len(batch) == 5000:
                    done += projection.write(batch)
                    batch = []
                    if progress:
                        progress("projecting live", done, total)
            done += projection.write(batch)
            live_seconds = time.perf_counter() - began
            live = fingerprint(connection.client)
            # The replay, as `citadel replay projections` runs it.
            began = time.perf_counter()
            replayed = rebuild(
                connection.client,
                history(store),
                progress=lambda n: progress("replaying", n, total) if progress else None,
            )
            replay_seconds = time.perf_counter() - began
            rebuilt = fingerprint(connection.client)
        finally:
            connection.close()
            store.close()
    figures = {
        "events": total,
        "replayed": replayed,
        "replay_seconds": replay_seconds,
        "replay_events_per_second": replayed / replay_seconds,
        "live_projection_events_per_second": done / live_seconds,
        "tables_equal_to_live": live == rebuilt,
        "tables": {table: {"rows": rows} for table, (rows, _) in rebuilt.items()},
    }
    path = write(
        "replay",
        {
            "events": events,
            "store": "sqlite",
            "clickhouse": "chdb (embedded)",
            "history": "200 five-node runs decided by the Run aggregate, then copied under new run ids",
            "live": "the same history through the projection in batches of 5,000 (no broker)",
            "replay_batch": 50_000,
        },
        figures,
    )
    return {"figures": figures, "path": str(path)}


def _long_run(store: RunStore, events: int) -> str:
    """One run of about `events` events: python nodes that each fail 19 times before succeeding."""
    attempts = 20
    nodes = -(-(events - 2) // (attempts * 4 - 1))  # 4 events per failed attempt, 3 for the last
    definition = parse_definition(
        {
            "name": "long",
            "nodes": [
                {
                    "id": f"n{i}",
                    "type": "python",
                    "needs": [f"n{i - 1}"] if i else [],
                    "retry": {"max_attempts": attempts, "delay_seconds": 0, "retry_on": ["Flaky"]},
                    "config": {"code": "def main():\n    return 1\n"},
                }
                for i in range(nodes)
            ],
        }
    ).model_dump(mode="json")
    start = start_command(definition, {}, "bench")
    commands = [start]
    run_id = start.run_id
    for i in range(nodes):
        for attempt in range(1, attempts + 1):
            result = {"node_id": f"n{i}", "attempt_id": f"{run_id}:n{i}:{attempt}", "duration_ms": 1.0}
            if attempt < attempts:
                commands.append(
                    Envelope.new("NodeFailed", run_id, {**result, "error_class": "Flaky", "message": "again"})
                )
                fired = {"timer_id": f"retry:{run_id}:n{i}:{attempt}"}
                commands.append(Envelope.new("TimerFired", run_id, fired))
            else:
                commands.append(Envelope.new("NodeSucceeded", run_id, {**result, "output": 1}))
    now = dt.datetime.now(dt.UTC)
    for first in range(0, len(commands), 1000):
        store.decide(commands[first : first + 1000], now)
    return run_id


def timetravel(events: int = 10_000, samples: int = 500) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="citadel-bench-") as home:
        settings = _settings(Path(home))
        store = RunStore(f"sqlite:///{home}/events.db", snapshot_interval=settings.snapshot_interval)
        try:
            run_id = _long_run(store, events)
            latest = store.run(run_id).version
            versions = random.Random(7).choices(range(1, latest + 1), k=samples)
            store.run(run_id, version=versions[0])  # warm the definition cache
            timings = []
            for version in versions:
                began = time.perf_counter()
                run = store.run(run_id, version=version)
                timings.append((time.perf_counter() - began) * 1000)
                assert run.version == version
            began = time.perf_counter()
            store.run(run_id)
            latest_ms = (time.perf_counter() - began) * 1000
        finally:
            store.close()
    figures = {"run_events": latest, "state_at_version_ms": summary(timings), "latest_state_ms": latest_ms}
    path = write(
        "timetravel",
        {
            "run_events": latest,
            "samples": samples,
            "versions": "uniformly random",
            "snapshot_interval": settings.snapshot_interval,
            "store": "sqlite",
            "run": "python nodes in a chain, each failing 19 times before it succeeds",
        },
        figures,
    )
    return {"figures": figures, "path": str(path)}


async def lag(runs: int = 10_000, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """During `throughput`: from an event's commit (its timestamp) to its row being visible in
    ClickHouse (the projector's insert returned)."""
    samples: list[float] = []

    def watch(stack: Stack) -> None:
        assert stack.projector is not None, "the embedded stack runs its projector"

        def written(envelopes: Any, visible_at: float) -> None:
            samples.extend(visible_at - e.time.timestamp() for e in envelopes)

        stack.projector.projector.on_written.append(written)

    result = await throughput(runs=runs, progress=progress, observe=watch, record=False)
    figures = {
        "events": len(samples),
        "commit_to_visible_seconds": summary(samples),
        "runs_per_second": result["figures"]["runs_per_second"],
        "throughput": result["figures"],
    }
    path = write(
        "lag",
        {
            "workload": f"throughput's workload, {runs} runs submitted at once (its figures: `throughput`)",
            "measured": "event timestamp (commit) -> projector insert returned (row visible)",
            "projector_batch": 5000,
            "projector_batch_ms": 200,
            "clickhouse": "chdb (embedded)",
        },
        figures,
    )
    return {"figures": figures, "path": str(path)}
