"""wait and approval: the engine completes them on a durable timer or on a Signal."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import pytest

from aggregates.store import RunStore
from schemas.envelope import Envelope

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(f"sqlite:///{tmp_path / 'events.db'}")


def start(store: RunStore, nodes: list[dict[str, Any]], run_input: dict[str, Any] | None = None) -> str:
    run_id = str(uuid.uuid4())
    definition = {"name": "control", "nodes": nodes, "outputs": {}}
    verdict = store.decide(
        [Envelope.new("StartRun", run_id, {"definition": definition, "input": run_input or {}})], NOW
    )[0]
    assert verdict.outcome == "applied", verdict.reason
    return run_id


def decide(
    store: RunStore, run_id: str, kind: str, payload: dict[str, Any], now: dt.datetime = NOW
) -> tuple[str, str]:
    verdict = store.decide([Envelope.new(kind, run_id, payload)], now)[0]
    return verdict.outcome, verdict.reason


def kinds(store: RunStore, run_id: str) -> list[str]:
    return [type(e).__name__ for e in store.run_events(run_id)]


def test_a_wait_for_seconds_records_its_due_time_and_completes_when_the_timer_fires(store: RunStore) -> None:
    run_id = start(
        store,
        [
            {"id": "pause", "type": "wait", "config": {"seconds": 90}},
            {
                "id": "after",
                "type": "transform",
                "needs": ["pause"],
                "config": {"output": "pause.waited_until"},
            },
        ],
    )
    run = store.run(run_id)
    assert run.nodes["pause"]["status"] == "scheduled"
    ((timer_id, timer),) = run.timers.items()
    assert dt.datetime.fromisoformat(timer["due_at"]) == NOW + dt.timedelta(seconds=90)
    assert kinds(store, run_id)[-1] == "WaitScheduled"

    assert decide(store, run_id, "TimerFired", {"timer_id": timer_id}, NOW + dt.timedelta(seconds=90)) == (
        "applied",
        "",
    )
    run = store.run(run_id)
    assert run.status == "completed"
    assert run.nodes["after"]["output"] == timer["due_at"]
    assert run.timers == {}


def test_a_wait_until_an_expression_uses_the_time_it_gives(store: RunStore) -> None:
    run_id = start(
        store,
        [{"id": "pause", "type": "wait", "config": {"until": "input.at"}}],
        {"at": "2026-03-02T08:30:00+00:00"},
    )
    (timer,) = store.run(run_id).timers.values()
    assert timer["due_at"] == "2026-03-02T08:30:00+00:00"


def test_a_wait_until_something_that_is_not_a_time_fails_the_node(store: RunStore) -> None:
    run_id = start(store, [{"id": "pause", "type": "wait", "config": {"until": "input.at"}}], {"at": "soon"})
    run = store.run(run_id)
    assert run.status == "failed"
    assert "ExpressionError" in (run.error or "") and "'soon' is not an RFC 3339 time" in (run.error or "")


def test_an_approval_waits_for_a_signal_whose_payload_becomes_its_output(store: RunStore) -> None:
    run_id = start(
        store,
        [
            {"id": "review", "type": "approval"},
            {
                "id": "ship",
                "type": "transform",
                "needs": ["review"],
                "config": {"output": "review.payload.approver"},
            },
        ],
    )
    assert store.run(run_id).nodes["review"]["status"] == "scheduled"
    assert kinds(store, run_id)[-1] == "ApprovalRequested"
    assert store.run(run_id).timers == {}  # no expiry asked for: no timer

    assert decide(store, run_id, "Signal", {"node_id": "review", "payload": {"approver": "ana"}}) == (
        "applied",
        "",
    )
    run = store.run(run_id)
    assert run.status == "completed"
    assert run.nodes["review"]["output"] == {"timed_out": False, "payload": {"approver": "ana"}}
    assert run.nodes["ship"]["output"] == "ana"


def test_a_signal_for_a_node_that_is_not_waiting_is_rejected_with_the_reason(store: RunStore) -> None:
    run_id = start(
        store,
        [{"id": "review", "type": "approval"}, {"id": "later", "type": "approval", "needs": ["review"]}],
    )
    outcome, reason = decide(store, run_id, "Signal", {"node_id": "later"})
    assert outcome == "rejected"
    assert "node 'later'" in reason and "is not waiting for a signal" in reason and "pending" in reason
    outcome, reason = decide(store, run_id, "Signal", {"node_id": "ghost"})
    assert (outcome, reason) == ("rejected", f"run {run_id} has no node 'ghost'")


def test_the_same_signal_delivered_twice_is_applied_once(store: RunStore) -> None:
    run_id = start(store, [{"id": "review", "type": "approval"}])
    signal = Envelope.new("Signal", run_id, {"node_id": "review", "payload": 1})
    assert store.decide([signal], NOW)[0].outcome == "applied"
    assert store.decide([signal], NOW)[0].outcome == "duplicate"
    assert kinds(store, run_id).count("NodeSucceeded") == 1


def test_an_expired_approval_fails_the_run_by_default(store: RunStore) -> None:
    run_id = start(store, [{"id": "review", "type": "approval", "config": {"expires_after_seconds": 60}}])
    ((timer_id, timer),) = store.run(run_id).timers.items()
    assert dt.datetime.fromisoformat(timer["due_at"]) == NOW + dt.timedelta(seconds=60)
    decide(store, run_id, "TimerFired", {"timer_id": timer_id}, NOW + dt.timedelta(seconds=60))
    run = store.run(run_id)
    assert run.status == "failed"
    assert "ApprovalTimeout" in (run.error or "")


def test_an_expired_approval_can_continue_down_a_timeout_branch(store: RunStore) -> None:
    run_id = start(
        store,
        [
            {
                "id": "review",
                "type": "approval",
                "config": {"expires_after_seconds": 60, "on_timeout": "continue"},
            },
            {
                "id": "escalate",
                "type": "log",
                "needs": ["review"],
                "when": "review.timed_out",
                "config": {"message": "'nobody answered'"},
            },
            {
                "id": "ship",
                "type": "log",
                "needs": ["review"],
                "when": "!review.timed_out",
                "config": {"message": "'approved'"},
            },
        ],
    )
    (timer_id,) = store.run(run_id).timers
    decide(store, run_id, "TimerFired", {"timer_id": timer_id}, NOW + dt.timedelta(seconds=61))
    run = store.run(run_id)
    assert run.status == "completed"
    assert run.nodes["escalate"]["status"] == "succeeded"
    assert run.nodes["ship"]["status"] == "skipped"


def test_a_signal_after_the_approval_expired_is_rejected(store: RunStore) -> None:
    run_id = start(
        store,
        [
            {
                "id": "review",
                "type": "approval",
                "config": {"expires_after_seconds": 5, "on_timeout": "continue"},
            },
            {"id": "next", "type": "approval", "needs": ["review"]},
        ],
    )
    (timer_id,) = store.run(run_id).timers
    decide(store, run_id, "TimerFired", {"timer_id": timer_id}, NOW + dt.timedelta(seconds=5))
    outcome, reason = decide(store, run_id, "Signal", {"node_id": "review", "payload": "late"})
    assert outcome == "rejected" and "succeeded" in reason


def test_cancelling_a_waiting_run_drops_its_timers(store: RunStore) -> None:
    run_id = start(store, [{"id": "pause", "type": "wait", "config": {"seconds": 3600}}])
    assert decide(store, run_id, "CancelRun", {"reason": "not needed"}) == ("applied", "")
    run = store.run(run_id)
    assert run.status == "cancelled" and run.timers == {}
