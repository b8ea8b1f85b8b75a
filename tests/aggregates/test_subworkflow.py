"""subworkflow: a node that starts a child run of a deployed workflow and waits for its outputs."""

from __future__ import annotations

from typing import Any

from aggregates.run import child_run_id
from tests.aggregates.support import RunUnderTest, python, workflow


def child_node(**fields: Any) -> dict[str, Any]:
    return {
        "id": "child",
        "type": "subworkflow",
        "needs": ["prep"],
        "config": {"workflow": "billing", "version": 2, "inputs": {"amount": "prep.total * 2"}},
        **fields,
    }


def parent_definition(**fields: Any) -> dict[str, Any]:
    return workflow(python("prep"), child_node(**fields), python("side"), outputs={"paid": "child.receipt"})


def test_a_subworkflow_node_requests_a_child_run_with_a_derived_id_and_its_evaluated_input(
    run: RunUnderTest,
) -> None:
    run.given(run.start(parent_definition()))
    events = run.when(run.succeeded("prep", {"total": 21}))
    assert events[-3:] == ["NodeScheduled child#1", "AttemptStarted child", "ChildRunRequested child"]
    request = run.last("ChildRunRequested")
    assert request.child_run_id == child_run_id(run.attempt_id("child"))
    assert (request.workflow, request.version, request.input) == ("billing", 2, {"amount": 42})


def test_the_childs_outputs_reported_for_the_node_attempt_complete_the_node(run: RunUnderTest) -> None:
    run.given(run.start(parent_definition()), run.succeeded("prep", {"total": 1}), run.succeeded("side"))
    events = run.when(run.succeeded("child", {"receipt": "r-9"}))
    assert events == ["NodeSucceeded child", "Completed"]
    assert run.last("Completed").outputs == {"paid": "r-9"}


def test_a_failed_child_fails_the_node_and_a_retry_starts_a_new_child(run: RunUnderTest) -> None:
    run.given(
        run.start(parent_definition(retry={"max_attempts": 2, "delay_seconds": 1})),
        run.succeeded("prep", {"total": 1}),
    )
    run.given(run.failed("child", "ChildRunFailed", "billing failed"))
    run.given(run.timer_fired(run.last("RetryScheduled").timer_id))
    second = run.last("ChildRunRequested")
    assert second.child_run_id == child_run_id(run.attempt_id("child", 2))
    assert second.child_run_id != child_run_id(run.attempt_id("child", 1))


def test_cancelling_the_parent_asks_to_cancel_the_running_child_first(run: RunUnderTest) -> None:
    run.given(run.start(parent_definition()), run.succeeded("prep", {"total": 1}))
    assert run.when(run.cancel()) == ["ChildCancelRequested child", "Cancelled"]
    assert run.last("ChildCancelRequested").child_run_id == child_run_id(run.attempt_id("child"))


def test_the_parent_failing_elsewhere_cancels_the_running_child(run: RunUnderTest) -> None:
    run.given(run.start(parent_definition()), run.succeeded("prep", {"total": 1}))
    events = run.when(run.failed("side"))
    assert events[-2:] == ["ChildCancelRequested child", "Failed side"]


def test_a_child_run_records_the_parent_node_it_reports_to(run: RunUnderTest) -> None:
    parent = {"run_id": "p", "node_id": "child", "attempt_id": "p:child:1"}
    command = run.command("StartRun", {"definition": workflow(python("a")), "parent": parent})
    run.given(command)
    assert run.store.run(run.run_id).parent == parent
