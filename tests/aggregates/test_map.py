"""map: one step per item of a list, at most `concurrency` at a time, results joined in order."""

from __future__ import annotations

from typing import Any

from tests.aggregates.support import RunUnderTest, python, transform, workflow


def fan_out(concurrency: int = 2, step: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    step = step or {
        "type": "python",
        "config": {"code": "def main(x, i):\n    return x\n", "inputs": {"x": "item * 10", "i": "index"}},
        "retry": {"max_attempts": 2, "delay_seconds": 1, "jitter": 0},
    }
    return {
        "id": "m",
        "type": "map",
        "needs": ["src"],
        "config": {"items": "src.values", "concurrency": concurrency, "node": step},
        **fields,
    }


def mapped(*nodes: dict[str, Any]) -> dict[str, Any]:
    return workflow(python("src"), fan_out(), *nodes, outputs={"all": "m"})


def scheduled(run: RunUnderTest) -> dict[str, Any]:
    return {e.node_id: e.inputs for e in run.events() if type(e).__name__ == "NodeScheduled"}


def test_a_map_schedules_as_many_items_as_its_concurrency_each_seeing_its_item_and_index(
    run: RunUnderTest,
) -> None:
    run.given(run.start(mapped()))
    events = run.when(run.succeeded("src", {"values": [1, 2, 3, 4]}))
    assert events == [
        "AttemptStarted src",
        "NodeSucceeded src",
        "NodeScheduled m#1",
        "AttemptStarted m",
        "MapStarted m",
        "NodeScheduled m[0]#1",
        "NodeScheduled m[1]#1",
    ]
    assert scheduled(run)["m[0]"] == {"x": 10, "i": 0}
    assert scheduled(run)["m[1]"] == {"x": 20, "i": 1}
    task = run.last("NodeScheduled")
    assert (task.node_type, task.inline) == ("python", False)


def test_each_finished_item_makes_room_for_the_next_and_the_output_keeps_the_order_of_the_items(
    run: RunUnderTest,
) -> None:
    run.given(run.start(mapped()), run.succeeded("src", {"values": [1, 2, 3]}))
    assert run.when(run.succeeded("m[1]", "second")) == [
        "AttemptStarted m[1]",
        "NodeSucceeded m[1]",
        "NodeScheduled m[2]#1",
    ]
    assert run.when(run.succeeded("m[2]", "third"))[-1] == "NodeSucceeded m[2]"
    events = run.when(run.succeeded("m[0]", "first"))
    assert events[-3:] == ["NodeSucceeded m[0]", "NodeSucceeded m", "Completed"]
    assert run.last("Completed").outputs == {"all": ["first", "second", "third"]}


def test_a_map_over_an_empty_list_succeeds_at_once_with_an_empty_list(run: RunUnderTest) -> None:
    run.given(run.start(mapped()))
    events = run.when(run.succeeded("src", {"values": []}))
    assert events[-2:] == ["NodeSucceeded m", "Completed"]
    assert run.last("Completed").outputs == {"all": []}


def test_items_that_are_not_a_list_fail_the_map_naming_the_field(run: RunUnderTest) -> None:
    run.given(run.start(mapped()))
    run.when(run.succeeded("src", {"values": "abc"}))
    failed = run.last("Failed")
    assert "ExpressionError" in failed.reason
    assert "config.items: items must be a list, got str" in failed.reason


def test_an_item_retries_by_its_step_policy_and_its_final_failure_fails_the_map_naming_the_item(
    run: RunUnderTest,
) -> None:
    run.given(run.start(mapped()), run.succeeded("src", {"values": [1, 2, 3]}))
    events = run.when(run.failed("m[1]", "ValueError", "bad item"))
    assert events == ["AttemptStarted m[1]", "NodeFailed m[1] (will retry)", "RetryScheduled m[1]#2"]
    timer = run.last("RetryScheduled").timer_id
    assert run.when(run.timer_fired(timer)) == ["NodeScheduled m[1]#2"]
    events = run.when(run.failed("m[1]", "ValueError", "still bad", attempt=2))
    assert events[1:] == ["NodeFailed m[1] (final)", "NodeFailed m (final)", "Failed m"]
    reason = run.last("Failed").reason
    assert "node 'm' failed" in reason and "item 1 failed after 2 attempt(s): still bad" in reason


def test_a_result_of_another_item_after_its_map_failed_changes_nothing(run: RunUnderTest) -> None:
    step = {"type": "python", "config": {"code": "def main():\n    return 1\n"}}
    run.given(
        run.start(workflow(python("src"), fan_out(step=step, on_error="continue"), python("after", "m"))),
        run.succeeded("src", {"values": [1, 2]}),
    )
    events = run.when(run.failed("m[0]"))
    assert events[1:4] == ["NodeFailed m[0] (final)", "NodeFailed m (final)", "NodeRecovered m"]
    assert run.when(run.succeeded("m[1]", 2)) == []


def test_transform_items_are_decided_at_once_even_for_a_long_list_one_at_a_time(run: RunUnderTest) -> None:
    step = {"type": "transform", "config": {"output": "item + index"}}
    run.given(run.start(workflow(python("src"), fan_out(concurrency=1, step=step), outputs={"all": "m"})))
    run.when(run.succeeded("src", {"values": list(range(2000))}))
    assert run.last("Completed").outputs == {"all": [2 * i for i in range(2000)]}


def test_a_map_node_is_an_ordinary_node_to_its_dependents(run: RunUnderTest) -> None:
    run.given(
        run.start(
            workflow(python("src"), fan_out(), transform("total", "size(m)", "m"), outputs={"n": "total"})
        )
    )
    run.given(run.succeeded("src", {"values": [5]}))
    assert run.when(run.succeeded("m[0]", 50))[-1] == "Completed"
    assert run.last("Completed").outputs == {"n": 1}
