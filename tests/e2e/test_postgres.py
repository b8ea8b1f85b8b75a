"""The PostgreSQL event-store path, against the local PostgreSQL: the same engine, one setting apart."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from aggregates.ledger import open_ledger
from aggregates.store import RunStore
from schemas.envelope import Envelope
from tests.conftest import EngineFactory
from tests.e2e.test_examples import example, run_to_end
from tests.pg import fresh_schema

pytestmark = pytest.mark.postgres


async def test_examples_run_to_completion_on_a_postgresql_event_store(engine_factory: EngineFactory) -> None:
    with fresh_schema() as url:
        async with engine_factory(store_url=url) as engine:
            linear = await run_to_end(engine, example("linear.yaml"), {"n": 4})
            retry = await run_to_end(engine, example("retry.yaml"), {"order": "pg"})
        store = RunStore(url)
        try:
            assert linear.outputs == {"result": 65, "note": "64 plus one"}
            assert retry.outputs == {"message": "order pg shipped after 3 attempts"}
            assert store.run(linear.run_id).status == "completed"
            # The outbox position and active-run set live in PostgreSQL too.
            ledger = open_ledger(url)
            assert ledger.position("run-events") >= len(store.run_events(linear.run_id))
            assert linear.run_id not in ledger.active_runs()
            ledger.close()
        finally:
            store.close()


def test_postgresql_store_rejects_a_concurrent_writer_and_the_decision_is_retried() -> None:
    with fresh_schema() as url:
        first, second = RunStore(url), RunStore(url)
        try:
            definition = example("retry.yaml")
            run_id = str(uuid.uuid4())
            now = dt.datetime.now(dt.UTC)
            start = Envelope.new("StartRun", run_id, {"definition": definition, "input": {"order": "o"}})
            assert first.decide([start], now)[0].outcome == "applied"
            # Both writers hold the run, then both decide on it: the second save conflicts,
            # reloads, and applies its command on top of the first writer's events.
            assert second.decide([start], now)[0].outcome == "duplicate"
            attempt = f"{run_id}:fetch:1"
            started = Envelope.new("AttemptStarted", run_id, {"node_id": "fetch", "attempt_id": attempt})
            failed = Envelope.new(
                "NodeFailed",
                run_id,
                {"node_id": "fetch", "attempt_id": attempt, "error_class": "ConnectionError", "message": "x"},
            )
            assert first.decide([started], now)[0].outcome == "applied"
            assert second.decide([failed], now)[0].outcome == "applied"
            kinds = [type(e).__name__ for e in first.run_events(run_id)]
            assert kinds[-3:] == ["AttemptStarted", "NodeFailed", "RetryScheduled"]
        finally:
            first.close()
            second.close()
