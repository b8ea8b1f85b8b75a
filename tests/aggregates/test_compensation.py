"""Compensation (saga): when a run fails, the nodes that succeeded and declare `compensate` are
undone one at a time, in reverse order of completion, before the run is failed."""

from __future__ import annotations

from typing import Any

from tests.aggregates.support import RunUnderTest, python, workflow


def undo(node_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": "python",
        "config": {"code": "def main(done):\n    return None\n", "inputs": {"done": node_id}},
        **fields,
    }


SAGA = workflow(
    python("reserve", compensate=undo("reserve")),
    python("charge", "reserve", compensate=undo("charge")),
    python("notify", "reserve"),
    python("ship", "charge", "notify"),
)


def test_a_failure_undoes_the_completed_steps_in_reverse_order_one_at_a_time_then_fails_the_run(
    run: RunUnderTest,
) -> None:
    run.given(
        run.start(SAGA),
        run.succeeded("reserve", {"hold": 7}),
        run.succeeded("charge", {"payment": "p-1"}),
        run.succeeded("notify"),
    )
    events = run.when(run.failed("ship", "RuntimeError", "carrier down"))
    assert events == [
        "AttemptStarted ship",
        "NodeFailed ship (final)",
        "CompensationStarted ship",
        "NodeScheduled charge.compensate#1",
    ]
    assert run.last("NodeScheduled").inputs == {"done": {"payment": "p-1"}}
    assert run.store.run(run.run_id).status == "compensating"

    assert run.when(run.succeeded("charge.compensate"))[-1] == "NodeScheduled reserve.compensate#1"
    assert run.last("NodeScheduled").inputs == {"done": {"hold": 7}}
    assert run.when(run.succeeded("reserve.compensate"))[-1] == "Failed ship"
    failed = run.last("Failed")
    assert failed.reason == "node 'ship' failed after 1 attempt(s): RuntimeError: carrier down"


def test_only_nodes_that_succeeded_are_compensated(run: RunUnderTest) -> None:
    run.given(run.start(SAGA), run.succeeded("reserve"))
    events = run.when(run.failed("charge"))
    assert events[-2:] == ["CompensationStarted charge", "NodeScheduled reserve.compensate#1"]


def test_a_run_failing_with_nothing_to_compensate_fails_at_once(run: RunUnderTest) -> None:
    run.given(run.start(SAGA))
    assert run.when(run.failed("reserve"))[-1] == "Failed reserve"


def test_a_compensation_step_that_keeps_failing_is_reported_and_the_others_still_run(
    run: RunUnderTest,
) -> None:
    retrying = undo("charge", retry={"max_attempts": 2, "delay_seconds": 5, "jitter": 0})
    definition = workflow(
        python("reserve", compensate=undo("reserve")),
        python("charge", "reserve", compensate=retrying),
        python("ship", "charge"),
    )
    run.given(run.start(definition), run.succeeded("reserve"), run.succeeded("charge"))
    run.given(run.failed("ship"))
    assert run.when(run.failed("charge.compensate"))[-1] == "RetryScheduled charge.compensate#2"
    run.given(run.timer_fired(run.last("RetryScheduled").timer_id))
    events = run.when(run.failed("charge.compensate", attempt=2))
    assert events[-2:] == ["NodeFailed charge.compensate (final)", "NodeScheduled reserve.compensate#1"]
    assert run.when(run.succeeded("reserve.compensate"))[-1] == "Failed ship"
    assert run.last("Failed").reason.endswith("; compensation failed for 'charge'")


def test_an_inline_compensation_runs_in_the_same_decision(run: RunUnderTest) -> None:
    definition = workflow(
        python("reserve", compensate={"type": "transform", "config": {"output": "reserve.hold"}}),
        python("charge", "reserve"),
    )
    run.given(run.start(definition), run.succeeded("reserve", {"hold": 3}))
    events = run.when(run.failed("charge"))
    assert events[-4:] == [
        "NodeScheduled reserve.compensate#1",
        "AttemptStarted reserve.compensate",
        "NodeSucceeded reserve.compensate",
        "Failed charge",
    ]
    assert run.last("NodeSucceeded").output == 3


def test_while_compensating_late_results_of_other_nodes_change_nothing_and_cancel_stops_it(
    run: RunUnderTest,
) -> None:
    definition = workflow(
        python("reserve", compensate=undo("reserve")),
        python("left", "reserve"),
        python("right", "reserve"),
    )
    run.given(run.start(definition), run.succeeded("reserve"), run.failed("left"))
    assert run.when(run.succeeded("right")) == []
    assert run.when(run.cancel("operator gave up")) == ["Cancelled"]
    assert run.when(run.succeeded("reserve.compensate")) == []


def test_a_pending_retry_of_another_node_is_dropped_when_compensation_starts(run: RunUnderTest) -> None:
    definition = workflow(
        python("reserve", compensate=undo("reserve")),
        python("left", "reserve", retry={"max_attempts": 3}),
        python("right", "reserve"),
    )
    run.given(run.start(definition), run.succeeded("reserve"), run.failed("left"))
    assert len(run.store.run(run.run_id).timers) == 1
    run.given(run.failed("right"))
    assert run.store.run(run.run_id).timers == {}
    tasks = run.store.run(run.run_id).unfinished_attempts()
    assert [t["node"].id for t in tasks] == ["reserve.compensate"]
