"""on_error: after a node's last attempt fails, fail the run, continue, or route to a handler."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import pytest

from aggregates.store import RunStore
from schemas.definition import DefinitionInvalid, parse_definition
from schemas.envelope import Envelope

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
CODE = {"code": "def main():\n    return 1"}


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(f"sqlite:///{tmp_path / 'events.db'}")


def start(store: RunStore, nodes: list[dict[str, Any]], outputs: dict[str, str] | None = None) -> str:
    run_id = str(uuid.uuid4())
    definition = {"name": "errors", "nodes": nodes, "outputs": outputs or {}}
    verdict = store.decide([Envelope.new("StartRun", run_id, {"definition": definition, "input": {}})], NOW)[
        0
    ]
    assert verdict.outcome == "applied", verdict.reason
    return run_id


def fail(store: RunStore, run_id: str, node: str) -> None:
    store.decide(
        [
            Envelope.new(
                "NodeFailed",
                run_id,
                {
                    "node_id": node,
                    "attempt_id": f"{run_id}:{node}:1",
                    "error_class": "ValueError",
                    "message": "bad data",
                },
            )
        ],
        NOW,
    )


def succeed(store: RunStore, run_id: str, node: str, output: Any = 1) -> None:
    store.decide(
        [
            Envelope.new(
                "NodeSucceeded",
                run_id,
                {"node_id": node, "attempt_id": f"{run_id}:{node}:1", "output": output},
            )
        ],
        NOW,
    )


def statuses(store: RunStore, run_id: str) -> dict[str, str]:
    return {node: state["status"] for node, state in store.run(run_id).nodes.items()}


def test_by_default_a_node_that_fails_for_good_fails_the_run(store: RunStore) -> None:
    run_id = start(store, [{"id": "a", "type": "python", "config": CODE}])
    fail(store, run_id, "a")
    assert store.run(run_id).status == "failed"


def test_continue_lets_dependents_run_and_see_the_error(store: RunStore) -> None:
    run_id = start(
        store,
        [
            {"id": "a", "type": "python", "config": CODE, "on_error": "continue"},
            {"id": "report", "type": "transform", "needs": ["a"], "config": {"output": "a.error_class"}},
        ],
        outputs={"seen": "report"},
    )
    fail(store, run_id, "a")
    run = store.run(run_id)
    assert run.status == "completed"
    assert statuses(store, run_id) == {"a": "recovered", "report": "succeeded"}
    assert run.outputs == {"seen": "ValueError"}
    kinds = [type(e).__name__ for e in store.run_events(run_id)]
    assert kinds[kinds.index("NodeFailed") + 1] == "NodeRecovered"


def test_a_handler_runs_when_its_node_fails_and_the_other_dependents_are_skipped(store: RunStore) -> None:
    run_id = start(
        store,
        [
            {"id": "charge", "type": "python", "config": CODE, "on_error": {"handler": "refund"}},
            {
                "id": "refund",
                "type": "transform",
                "needs": ["charge"],
                "config": {"output": "charge.message"},
            },
            {"id": "ship", "type": "transform", "needs": ["charge"], "config": {"output": "'shipped'"}},
        ],
    )
    fail(store, run_id, "charge")
    run = store.run(run_id)
    assert run.status == "completed"
    assert statuses(store, run_id) == {"charge": "recovered", "refund": "succeeded", "ship": "skipped"}
    assert run.nodes["refund"]["output"] == "bad data"


def test_a_handler_is_skipped_when_its_node_succeeds(store: RunStore) -> None:
    run_id = start(
        store,
        [
            {"id": "charge", "type": "python", "config": CODE, "on_error": {"handler": "refund"}},
            {"id": "refund", "type": "transform", "needs": ["charge"], "config": {"output": "'refunded'"}},
            {"id": "ship", "type": "transform", "needs": ["charge"], "config": {"output": "'shipped'"}},
        ],
    )
    succeed(store, run_id, "charge")
    assert statuses(store, run_id) == {"charge": "succeeded", "refund": "skipped", "ship": "succeeded"}
    assert store.run(run_id).status == "completed"


def test_retries_come_first_and_on_error_applies_only_after_the_last_attempt(store: RunStore) -> None:
    run_id = start(
        store,
        [
            {
                "id": "a",
                "type": "python",
                "config": CODE,
                "on_error": "continue",
                "retry": {"max_attempts": 2, "delay_seconds": 1},
            }
        ],
    )
    fail(store, run_id, "a")
    assert statuses(store, run_id) == {"a": "retry_wait"}


@pytest.mark.parametrize(
    ("handler_node", "message"),
    [
        ({"id": "h", "type": "log", "config": {"message": "'x'"}}, "handler 'h' must list 'a' in its needs"),
        ({"id": "other", "type": "log", "config": {"message": "'x'"}}, "handler 'h' is not a node"),
    ],
)
def test_a_handler_must_exist_and_need_the_node_it_handles(
    handler_node: dict[str, Any], message: str
) -> None:
    with pytest.raises(DefinitionInvalid) as error:
        parse_definition(
            {
                "name": "bad",
                "nodes": [
                    {"id": "a", "type": "python", "config": CODE, "on_error": {"handler": "h"}},
                    handler_node,
                ],
            }
        )
    assert [(p.location, p.message) for p in error.value.problems] == [("nodes.a.on_error.handler", message)]
