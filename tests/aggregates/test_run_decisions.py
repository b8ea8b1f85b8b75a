"""Specifications of the `Run` state machine: given events, when a command, then events.

Each test drives a real `RunStore` on SQLite with a clock it controls (the `now` of each
decide step). Python nodes only get scheduled here; the test plays the executor and sends
their results back as commands. Transform, condition and log nodes run inside the decide step.
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import pytest

from aggregates.store import RunStore
from schemas.definition import RetryPolicy, parse_definition
from schemas.envelope import Envelope
from tests.aggregates.support import NOW, RunUnderTest, python, summary, transform, workflow

DIAMOND = workflow(
    python("a"),
    python("b", "a", inputs={"x": "a.n"}),
    python("c", "a", inputs={"x": "a.n"}),
    python("d", "b", "c", inputs={"left": "b", "right": "c"}),
    outputs={"result": "d"},
)


# ---- scheduling along the graph ---------------------------------------------


def test_a_started_run_schedules_its_first_node_only(run: RunUnderTest) -> None:
    events = run.when(run.start(workflow(python("a"), python("b", "a"), python("c", "b"))))

    assert run.outcome == "applied"
    assert events == ["Started", "NodeScheduled a#1"]


def test_a_linear_chain_runs_one_node_after_the_other_and_completes(run: RunUnderTest) -> None:
    run.given(run.start(workflow(python("a"), python("b", "a"), python("c", "b"))))

    assert run.when(run.succeeded("a")) == ["AttemptStarted a", "NodeSucceeded a", "NodeScheduled b#1"]
    assert run.when(run.succeeded("b")) == ["AttemptStarted b", "NodeSucceeded b", "NodeScheduled c#1"]
    assert run.when(run.succeeded("c")) == ["AttemptStarted c", "NodeSucceeded c", "Completed"]
    assert run.store.run(run.run_id).status == "completed"


def test_the_branches_of_a_diamond_are_scheduled_together(run: RunUnderTest) -> None:
    run.given(run.start(DIAMOND))

    events = run.when(run.succeeded("a", {"n": 2}))

    assert events == ["AttemptStarted a", "NodeSucceeded a", "NodeScheduled b#1", "NodeScheduled c#1"]


def test_the_join_of_a_diamond_waits_for_both_branches(run: RunUnderTest) -> None:
    run.given(run.start(DIAMOND), run.succeeded("a", {"n": 2}))

    assert run.when(run.succeeded("c", "from c")) == ["AttemptStarted c", "NodeSucceeded c"]
    assert run.when(run.succeeded("b", "from b")) == [
        "AttemptStarted b",
        "NodeSucceeded b",
        "NodeScheduled d#1",
    ]
    assert run.last("NodeScheduled").inputs == {"left": "from b", "right": "from c"}
    assert run.when(run.succeeded("d", 42)) == ["AttemptStarted d", "NodeSucceeded d", "Completed"]
    assert run.store.run(run.run_id).outputs == {"result": 42}


def test_scheduled_python_nodes_carry_their_inputs_evaluated_from_upstream_outputs(
    run: RunUnderTest,
) -> None:
    definition = workflow(
        python("fetch"),
        python("send", "fetch", inputs={"to": "input.email", "count": "size(fetch.items)"}),
    )
    run.given(run.start(definition, {"email": "ada@example.org"}))

    run.when(run.succeeded("fetch", {"items": [1, 2, 3]}))

    scheduled = run.last("NodeScheduled")
    assert (scheduled.node_id, scheduled.inputs) == ("send", {"to": "ada@example.org", "count": 3})
    assert scheduled.attempt_id == run.attempt_id("send")


def test_inline_nodes_run_in_the_decide_step_without_an_executor(run: RunUnderTest) -> None:
    definition = workflow(
        python("a"),
        transform("double", "a * 2", "a"),
        {
            "id": "big",
            "type": "condition",
            "needs": ["double"],
            "config": {"expression": "double > 10"},
        },
        {
            "id": "note",
            "type": "log",
            "needs": ["big"],
            "config": {"message": "big.result ? 'big' : 'small'"},
        },
        outputs={"double": "double", "big": "big.result", "note": "note.message"},
    )
    run.given(run.start(definition))

    events = run.when(run.succeeded("a", 7))

    assert events == [
        "AttemptStarted a",
        "NodeSucceeded a",
        "NodeScheduled double#1",
        "AttemptStarted double",
        "NodeSucceeded double",
        "NodeScheduled big#1",
        "AttemptStarted big",
        "NodeSucceeded big",
        "NodeScheduled note#1",
        "AttemptStarted note",
        "NodeSucceeded note",
        "Completed",
    ]
    assert run.store.run(run.run_id).outputs == {"double": 14, "big": True, "note": "big"}


def test_a_run_of_only_inline_nodes_completes_when_it_starts(run: RunUnderTest) -> None:
    definition = workflow(transform("greeting", "'hello ' + input.name"), outputs={"greeting": "greeting"})

    events = run.when(run.start(definition, {"name": "Ada"}))

    assert events == [
        "Started",
        "NodeScheduled greeting#1",
        "AttemptStarted greeting",
        "NodeSucceeded greeting",
        "Completed",
    ]
    assert run.store.run(run.run_id).outputs == {"greeting": "hello Ada"}


def test_an_inline_node_whose_expression_fails_fails_the_run_without_retry(
    run: RunUnderTest,
) -> None:
    node = transform("pick", "input.missing")
    node["retry"] = {"max_attempts": 3}
    run.when(run.start(workflow(node)))

    failed = run.last("NodeFailed")
    assert (failed.error_class, failed.will_retry) == ("ExpressionError", False)
    assert run.store.run(run.run_id).status == "failed"


def test_a_python_node_whose_inputs_fail_to_evaluate_fails_the_run_without_retry(
    run: RunUnderTest,
) -> None:
    node = python("send", inputs={"to": "input.email"}, retry={"max_attempts": 3})

    events = run.when(run.start(workflow(node), {}))

    assert events == ["Started", "NodeScheduled send#1", "NodeFailed send (final)", "Failed send"]
    failed = run.last("NodeFailed")
    assert failed.error_class == "ExpressionError"
    assert "config.inputs.to" in failed.message


# ---- when: skipping ---------------------------------------------------------

WHEN_GRAPH = workflow(
    python("a"),
    python("b", "a", when="a.go"),
    python("after_b", "b"),
    python("join", "a", "b", inputs={"from_b": "b"}),
)


def test_a_false_when_skips_the_node_and_what_depends_only_on_it_but_a_join_still_runs(
    run: RunUnderTest,
) -> None:
    run.given(run.start(WHEN_GRAPH))

    events = run.when(run.succeeded("a", {"go": False}))

    assert events == [
        "AttemptStarted a",
        "NodeSucceeded a",
        "NodeSkipped b",
        "NodeSkipped after_b",
        "NodeScheduled join#1",
    ]
    assert run.last("NodeScheduled").inputs == {"from_b": None}  # a skipped node's output is null


def test_a_run_whose_remaining_nodes_are_skipped_completes(run: RunUnderTest) -> None:
    run.given(run.start(WHEN_GRAPH), run.succeeded("a", {"go": False}))

    assert run.when(run.succeeded("join")) == ["AttemptStarted join", "NodeSucceeded join", "Completed"]


def test_a_true_when_schedules_the_node(run: RunUnderTest) -> None:
    run.given(run.start(WHEN_GRAPH))

    events = run.when(run.succeeded("a", {"go": True}))

    assert events == ["AttemptStarted a", "NodeSucceeded a", "NodeScheduled b#1"]


def test_a_node_with_a_false_when_and_no_needs_is_skipped_at_start(run: RunUnderTest) -> None:
    definition = workflow(python("a", when="input.enabled"), python("b", "a"))

    events = run.when(run.start(definition, {"enabled": False}))

    assert events == ["Started", "NodeSkipped a", "NodeSkipped b", "Completed"]


@pytest.mark.parametrize(
    ("when", "input", "message"),
    [
        ("input.flag", {}, "when:"),
        ("input.flag", {"flag": "yes"}, "when must be a boolean, got str"),
        ("input.flag", {"flag": 1}, "when must be a boolean, got int"),
    ],
    ids=["errors", "is-a-string", "is-a-number"],
)
def test_a_when_that_errors_or_is_not_boolean_fails_the_run_with_an_expression_error(
    run: RunUnderTest, when: str, input: dict[str, Any], message: str
) -> None:
    node = python("gated", when=when, retry={"max_attempts": 5})

    events = run.when(run.start(workflow(node), input))

    assert events == [
        "Started",
        "NodeScheduled gated#1",
        "NodeFailed gated (final)",
        "Failed gated",
    ]
    failed = run.last("NodeFailed")
    assert failed.error_class == "ExpressionError"
    assert message in failed.message
    state = run.store.run(run.run_id)
    reason = run.last("Failed").reason
    assert (state.status, state.error) == ("failed", reason)
    assert "'gated'" in reason and "ExpressionError" in reason


# ---- retries ------------------------------------------------------------------

RETRY: dict[str, Any] = {
    "max_attempts": 3,
    "backoff": "exponential",
    "delay_seconds": 2.0,
    "multiplier": 3.0,
    "jitter": 0.5,
}
RETRYING = workflow(python("flaky", retry=RETRY), outputs={"value": "flaky"})


def test_a_failed_attempt_with_attempts_left_schedules_a_retry_with_backoff(
    run: RunUnderTest,
) -> None:
    run.given(run.start(RETRYING))

    events = run.when(run.failed("flaky", "ConnectionError", "refused"))

    assert events == ["AttemptStarted flaky", "NodeFailed flaky (will retry)", "RetryScheduled flaky#2"]
    retry = run.last("RetryScheduled")
    timer_id = f"retry:{run.attempt_id('flaky', 1)}"
    delay = RetryPolicy.model_validate(RETRY).delay_before(2, seed=timer_id)
    assert retry.timer_id == timer_id
    assert retry.delay_seconds == pytest.approx(delay)
    assert 2.0 * 0.5 <= delay <= 2.0 * 1.5  # the first delay, ± 50 % jitter
    assert dt.datetime.fromisoformat(retry.due_at) == NOW + dt.timedelta(seconds=delay)


def test_the_delay_grows_exponentially_from_attempt_to_attempt(run: RunUnderTest) -> None:
    later = NOW + dt.timedelta(minutes=5)
    first_timer = f"retry:{run.attempt_id('flaky', 1)}"
    run.given(run.start(RETRYING), run.failed("flaky"), run.timer_fired(first_timer))

    events = run.when(run.failed("flaky", attempt=2), now=later)

    assert events == ["AttemptStarted flaky", "NodeFailed flaky (will retry)", "RetryScheduled flaky#3"]
    retry = run.last("RetryScheduled")
    delay = RetryPolicy.model_validate(RETRY).delay_before(3, seed=f"retry:{run.attempt_id('flaky', 2)}")
    assert retry.delay_seconds == pytest.approx(delay)
    assert 6.0 * 0.5 <= delay <= 6.0 * 1.5  # delay_seconds * multiplier, ± 50 % jitter
    assert dt.datetime.fromisoformat(retry.due_at) == later + dt.timedelta(seconds=delay)


def test_a_retry_waits_for_its_timer(run: RunUnderTest) -> None:
    run.given(run.start(RETRYING), run.failed("flaky"))

    state = run.store.run(run.run_id)
    assert state.nodes["flaky"]["status"] == "retry_wait"
    assert state.unfinished_attempts() == []
    assert run.when(run.succeeded("flaky", "stale")) == []  # attempt 1 is over


@pytest.mark.parametrize(
    "early_by", [dt.timedelta(0), dt.timedelta(seconds=1)], ids=["at-due-time", "before-due-time"]
)
def test_the_retry_timer_firing_schedules_the_next_attempt(run: RunUnderTest, early_by: dt.timedelta) -> None:
    run.given(run.start(RETRYING), run.failed("flaky"))
    retry = run.last("RetryScheduled")
    fired_at = dt.datetime.fromisoformat(retry.due_at) - early_by

    events = run.when(run.timer_fired(retry.timer_id), now=fired_at)

    assert events == ["NodeScheduled flaky#2"]
    scheduled = run.last("NodeScheduled")
    assert (scheduled.attempt_id, scheduled.timer_id) == (
        run.attempt_id("flaky", 2),
        retry.timer_id,
    )


def test_success_on_the_second_attempt_completes_the_run(run: RunUnderTest) -> None:
    run.given(run.start(RETRYING), run.failed("flaky"))
    run.given(run.timer_fired(run.last("RetryScheduled").timer_id))

    events = run.when(run.succeeded("flaky", "finally", attempt=2))

    assert events == ["AttemptStarted flaky", "NodeSucceeded flaky", "Completed"]
    assert run.store.run(run.run_id).outputs == {"value": "finally"}


def test_a_retried_node_sees_its_attempt_number_in_its_inputs(run: RunUnderTest) -> None:
    node = python("call", inputs={"attempt": "run.attempt", "run": "run.id"}, retry=RETRY)
    run.given(run.start(workflow(node)))
    first = run.last("NodeScheduled").inputs
    run.given(run.failed("call"))
    run.given(run.timer_fired(run.last("RetryScheduled").timer_id))

    assert first == {"attempt": 1, "run": run.run_id}
    assert run.last("NodeScheduled").inputs == {"attempt": 2, "run": run.run_id}


def test_a_retry_timer_fired_twice_under_its_command_id_is_a_duplicate(run: RunUnderTest) -> None:
    run.given(run.start(RETRYING), run.failed("flaky"))
    timer_id = run.last("RetryScheduled").timer_id
    fired = run.command("TimerFired", {"timer_id": timer_id}, id=f"{timer_id}:fired")
    run.given(fired)

    assert run.when(fired) == []
    assert run.outcome == "duplicate"


def test_a_result_of_a_superseded_attempt_changes_nothing(run: RunUnderTest) -> None:
    run.given(run.start(RETRYING), run.failed("flaky"))
    run.given(run.timer_fired(run.last("RetryScheduled").timer_id))

    assert run.when(run.succeeded("flaky", "late", attempt=1)) == []
    assert run.when(run.failed("flaky", attempt=1)) == []
    assert run.store.run(run.run_id).nodes["flaky"]["status"] == "scheduled"


def test_an_error_class_outside_retry_on_is_not_retried(run: RunUnderTest) -> None:
    node = python("call", retry={"max_attempts": 5, "retry_on": ["TimeoutError"]})
    run.given(run.start(workflow(node)))

    events = run.when(run.failed("call", "ValueError", "bad request"))

    assert events == ["AttemptStarted call", "NodeFailed call (final)", "Failed call"]


def test_an_error_class_in_retry_on_is_retried(run: RunUnderTest) -> None:
    node = python("call", retry={"max_attempts": 5, "retry_on": ["TimeoutError"]})
    run.given(run.start(workflow(node)))

    events = run.when(run.failed("call", "TimeoutError", "slow"))

    assert events == ["AttemptStarted call", "NodeFailed call (will retry)", "RetryScheduled call#2"]


def test_a_node_without_a_retry_policy_fails_the_run_on_its_first_failure(
    run: RunUnderTest,
) -> None:
    run.given(run.start(workflow(python("once"), python("next", "once"))))

    assert run.when(run.failed("once")) == ["AttemptStarted once", "NodeFailed once (final)", "Failed once"]


def test_exhausted_retries_fail_the_run_with_a_reason_naming_node_and_error(
    run: RunUnderTest,
) -> None:
    node = python("flaky", retry={"max_attempts": 2, "delay_seconds": 0})
    run.given(run.start(workflow(node, python("after", "flaky"))), run.failed("flaky"))
    run.given(run.timer_fired(run.last("RetryScheduled").timer_id))

    events = run.when(run.failed("flaky", "ConnectionError", "refused again", attempt=2))

    assert events == ["AttemptStarted flaky", "NodeFailed flaky (final)", "Failed flaky"]
    failed = run.last("Failed")
    assert failed.node_id == "flaky"
    for part in ("'flaky'", "2 attempt(s)", "ConnectionError", "refused again"):
        assert part in failed.reason
    state = run.store.run(run.run_id)
    assert (state.status, state.error) == ("failed", failed.reason)
    assert state.nodes["after"]["status"] == "pending"


def test_a_timer_that_is_not_pending_is_rejected(run: RunUnderTest) -> None:
    run.given(run.start(RETRYING))

    assert run.when(run.timer_fired("retry:nothing")) == []
    assert run.outcome == "rejected"
    assert "retry:nothing" in run.reason


# ---- cancelling -------------------------------------------------------------


def test_cancelling_a_running_run_records_the_reason(run: RunUnderTest) -> None:
    run.given(run.start(DIAMOND), run.succeeded("a", {"n": 1}))

    events = run.when(run.cancel("wrong input"))

    assert events == ["Cancelled"]
    state = run.store.run(run.run_id)
    assert (state.status, state.error) == ("cancelled", "wrong input")
    assert state.unfinished_attempts() == []


def test_results_after_a_cancel_change_nothing_and_schedule_nothing(run: RunUnderTest) -> None:
    run.given(run.start(DIAMOND), run.succeeded("a", {"n": 1}), run.cancel())

    events = run.when(run.succeeded("b"), run.succeeded("c"), run.failed("b"))

    assert events == []
    assert "rejected" not in [v.outcome for v in run.verdicts]
    assert run.store.run(run.run_id).status == "cancelled"


def test_a_retry_timer_firing_after_a_cancel_schedules_nothing(run: RunUnderTest) -> None:
    run.given(run.start(RETRYING), run.failed("flaky"))
    timer_id = run.last("RetryScheduled").timer_id
    run.given(run.cancel())

    assert run.when(run.timer_fired(timer_id)) == []
    assert run.store.run(run.run_id).timers == {}


@pytest.mark.parametrize("ending", ["completed", "failed", "cancelled"])
def test_cancelling_a_finished_run_is_rejected(run: RunUnderTest, ending: str) -> None:
    run.given(run.start(workflow(python("a"))))
    endings = {
        "completed": run.succeeded("a"),
        "failed": run.failed("a"),
        "cancelled": run.cancel(),
    }
    run.given(endings[ending])

    assert run.when(run.cancel()) == []
    assert run.outcome == "rejected"
    assert f"already {ending}" in run.reason


# ---- exactly once -------------------------------------------------------------


def test_a_command_delivered_twice_is_a_duplicate_the_second_time(run: RunUnderTest) -> None:
    run.given(run.start(DIAMOND))
    result = run.succeeded("a", {"n": 1})
    run.given(result)

    assert run.when(result) == []
    assert run.outcome == "duplicate"


def test_a_command_repeated_within_one_batch_is_applied_once(run: RunUnderTest) -> None:
    run.given(run.start(DIAMOND))
    result = run.succeeded("a", {"n": 1})

    events = run.when(result, result)

    assert events == ["AttemptStarted a", "NodeSucceeded a", "NodeScheduled b#1", "NodeScheduled c#1"]
    assert [v.outcome for v in run.verdicts] == ["applied", "duplicate"]


def test_a_redelivered_start_is_a_duplicate(run: RunUnderTest) -> None:
    start = run.start(DIAMOND)
    run.given(start)

    assert run.when(start) == []
    assert run.outcome == "duplicate"


def test_a_cancel_delivered_twice_is_a_duplicate_not_a_rejection(run: RunUnderTest) -> None:
    run.given(run.start(DIAMOND))
    cancel = run.cancel()
    run.given(cancel)

    assert run.when(cancel) == []
    assert run.outcome == "duplicate"


def test_the_same_attempt_result_under_a_new_command_id_is_applied_once(run: RunUnderTest) -> None:
    run.given(run.start(DIAMOND), run.succeeded("a", {"n": 1}))

    events = run.when(run.succeeded("a", {"n": 999}))

    assert events == []
    assert run.outcome != "rejected"
    assert run.store.run(run.run_id).nodes["a"]["output"] == {"n": 1}


def test_a_failure_after_the_attempt_succeeded_changes_nothing(run: RunUnderTest) -> None:
    run.given(run.start(DIAMOND), run.succeeded("a", {"n": 1}))

    assert run.when(run.failed("a")) == []
    assert run.store.run(run.run_id).status == "running"


def test_a_repeated_attempt_started_is_recorded_once(run: RunUnderTest) -> None:
    run.given(run.start(DIAMOND))
    started = {"node_id": "a", "attempt_id": run.attempt_id("a")}

    assert run.when(run.command("AttemptStarted", started)) == ["AttemptStarted a"]
    assert run.when(run.command("AttemptStarted", started)) == []


@pytest.mark.parametrize("finish", ["succeeded", "failed-will-retry"])
def test_an_attempt_started_after_the_attempt_finished_changes_nothing(
    run: RunUnderTest, finish: str
) -> None:
    node = python("a", retry={"max_attempts": 3})
    run.given(run.start(workflow(node, python("b", "a"))))
    run.given(run.succeeded("a") if finish == "succeeded" else run.failed("a"))
    started = {"node_id": "a", "attempt_id": run.attempt_id("a")}

    assert run.when(run.command("AttemptStarted", started)) == []


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ("succeeded", ["AttemptStarted a", "NodeSucceeded a", "NodeScheduled b#1"]),
        ("failed-will-retry", ["AttemptStarted a", "NodeFailed a (will retry)", "RetryScheduled a#2"]),
    ],
)
def test_a_result_for_an_attempt_whose_start_was_not_reported_records_the_start_first(
    run: RunUnderTest, finish: str, expected: list[str]
) -> None:
    node = python("a", retry={"max_attempts": 3})
    run.given(run.start(workflow(node, python("b", "a"))))

    events = run.when(run.succeeded("a") if finish == "succeeded" else run.failed("a"))

    assert events == expected
    started = run.last("AttemptStarted")
    assert (started.node_id, started.attempt_id) == ("a", run.attempt_id("a"))


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ("succeeded", ["NodeSucceeded a", "NodeScheduled b#1"]),
        ("failed-will-retry", ["NodeFailed a (will retry)", "RetryScheduled a#2"]),
    ],
)
def test_a_result_for_an_attempt_whose_start_was_reported_records_no_second_start(
    run: RunUnderTest, finish: str, expected: list[str]
) -> None:
    node = python("a", retry={"max_attempts": 3})
    run.given(run.start(workflow(node, python("b", "a"))))
    started = {"node_id": "a", "attempt_id": run.attempt_id("a")}
    run.given(run.command("AttemptStarted", started))

    events = run.when(run.succeeded("a") if finish == "succeeded" else run.failed("a"))

    assert events == expected
    assert [summary(e) for e in run.events()].count("AttemptStarted a") == 1


# ---- rejections ---------------------------------------------------------------


def test_a_command_for_an_unknown_run_is_rejected_naming_the_run(store: RunStore) -> None:
    stranger = RunUnderTest(store)

    assert stranger.when(stranger.succeeded("a")) == []
    assert stranger.outcome == "rejected"
    assert stranger.run_id in stranger.reason


def test_a_command_whose_run_id_is_not_a_uuid_is_rejected(store: RunStore) -> None:
    start = Envelope.new("StartRun", "order-17", {"definition": DIAMOND}, time=NOW)

    (verdict,) = store.decide([start], NOW)

    assert verdict.outcome == "rejected"
    assert "'order-17' is not a UUID" in verdict.reason


def test_a_result_for_an_unknown_attempt_is_rejected(run: RunUnderTest) -> None:
    run.given(run.start(DIAMOND))

    assert run.when(run.succeeded("a", attempt=7)) == []
    assert run.outcome == "rejected"
    assert run.attempt_id("a", 7) in run.reason


def test_a_result_naming_another_node_than_its_attempt_is_rejected(run: RunUnderTest) -> None:
    run.given(run.start(DIAMOND))
    mismatched = {"node_id": "b", "attempt_id": run.attempt_id("a"), "output": 1}

    assert run.when(run.command("NodeSucceeded", mismatched)) == []
    assert run.outcome == "rejected"


def test_a_command_with_a_malformed_payload_is_rejected_naming_the_field(run: RunUnderTest) -> None:
    run.given(run.start(DIAMOND))

    run.when(run.command("NodeFailed", {"node_id": "a", "attempt_id": run.attempt_id("a")}))

    assert run.outcome == "rejected"
    assert "payload.error_class" in run.reason


def test_a_rejected_command_does_not_stop_the_rest_of_its_batch(run: RunUnderTest) -> None:
    run.given(run.start(DIAMOND))

    events = run.when(run.succeeded("a", attempt=9), run.succeeded("a", {"n": 1}))

    assert [v.outcome for v in run.verdicts] == ["rejected", "applied"]
    assert events == ["AttemptStarted a", "NodeSucceeded a", "NodeScheduled b#1", "NodeScheduled c#1"]


# ---- starting -----------------------------------------------------------------

TYPED_INPUT = workflow(
    python("a"),
    input={
        "type": "object",
        "required": ["email"],
        "properties": {"email": {"type": "string"}, "count": {"type": "integer"}},
    },
)


def test_a_start_whose_input_violates_the_input_schema_is_rejected_naming_the_field(
    run: RunUnderTest,
) -> None:
    events = run.when(run.start(TYPED_INPUT, {"email": "ada@example.org", "count": "three"}))

    assert events == []
    assert run.outcome == "rejected"
    assert "input.count" in run.reason
    with pytest.raises(KeyError):
        run.store.run(run.run_id)


def test_a_start_missing_a_required_input_field_is_rejected_naming_it(run: RunUnderTest) -> None:
    run.when(run.start(TYPED_INPUT, {"count": 3}))

    assert run.outcome == "rejected"
    assert "'email'" in run.reason


def test_a_rejected_start_deploys_nothing(run: RunUnderTest) -> None:
    run.when(run.start(TYPED_INPUT, {"count": 3}))

    assert run.outcome == "rejected"
    with pytest.raises(KeyError):
        run.store.workflow("spec")


def test_a_start_with_input_matching_the_schema_is_applied(run: RunUnderTest) -> None:
    run.when(run.start(TYPED_INPUT, {"email": "ada@example.org", "count": 3}))

    assert run.outcome == "applied"
    assert run.store.run(run.run_id).input == {"email": "ada@example.org", "count": 3}


def test_a_start_for_an_existing_run_id_is_a_duplicate_and_changes_nothing(
    run: RunUnderTest,
) -> None:
    run.given(run.start(DIAMOND, {"first": True}))

    events = run.when(run.start(workflow(python("other")), {"first": False}))

    assert events == []
    assert run.outcome == "duplicate"
    assert run.store.run(run.run_id).input == {"first": True}


def test_a_start_with_an_invalid_definition_is_rejected_naming_the_problem(
    run: RunUnderTest,
) -> None:
    run.when(run.start(workflow(python("a", "ghost"))))

    assert run.outcome == "rejected"
    assert "nodes.a.needs" in run.reason and "'ghost'" in run.reason


def test_a_start_naming_a_workflow_that_is_not_deployed_is_rejected(run: RunUnderTest) -> None:
    run.when(run.command("StartRun", {"workflow": "nowhere"}))

    assert run.outcome == "rejected"
    assert "'nowhere'" in run.reason


# ---- outputs ------------------------------------------------------------------


def test_run_outputs_are_evaluated_from_node_outputs_and_input(run: RunUnderTest) -> None:
    definition = workflow(
        python("price"),
        python("tax", "price"),
        outputs={
            "total": "price.amount + tax.amount",
            "customer": "input.customer",
            "lines": "[price.amount, tax.amount]",
        },
    )
    run.given(run.start(definition, {"customer": "Ada"}), run.succeeded("price", {"amount": 100}))

    events = run.when(run.succeeded("tax", {"amount": 19}))

    assert events == ["AttemptStarted tax", "NodeSucceeded tax", "Completed"]
    assert run.last("Completed").outputs == {"total": 119, "customer": "Ada", "lines": [100, 19]}
    assert run.store.run(run.run_id).outputs == {
        "total": 119,
        "customer": "Ada",
        "lines": [100, 19],
    }


def test_outputs_that_fail_to_evaluate_fail_the_run(run: RunUnderTest) -> None:
    definition = workflow(python("a"), outputs={"x": "a.missing"})
    run.given(run.start(definition))

    events = run.when(run.succeeded("a", {}))

    assert events == ["AttemptStarted a", "NodeSucceeded a", "Failed"]
    assert "workflow outputs" in run.last("Failed").reason


# ---- workflow versions --------------------------------------------------------


def test_starting_runs_with_the_same_definition_version_twice_is_fine(store: RunStore) -> None:
    first, second = RunUnderTest(store), RunUnderTest(store)
    first.when(first.start(DIAMOND))
    second.when(second.start(DIAMOND))

    assert (first.outcome, second.outcome) == ("applied", "applied")
    assert list(store.workflow("spec").versions) == ["1"]


def test_a_different_definition_under_a_deployed_version_is_rejected(store: RunStore) -> None:
    first, second = RunUnderTest(store), RunUnderTest(store)
    first.given(first.start(DIAMOND))

    events = second.when(second.start(workflow(python("other"))))

    assert events == []
    assert second.outcome == "rejected"
    assert "version 1" in second.reason and "higher version" in second.reason


def test_deploying_the_same_version_again_reports_nothing_new(store: RunStore) -> None:
    definition = parse_definition(DIAMOND)

    assert store.deploy(definition) is True
    assert store.deploy(definition) is False
    assert list(store.workflow("spec").versions) == ["1"]


def test_a_running_run_keeps_its_definition_when_a_new_version_is_deployed(
    store: RunStore,
) -> None:
    old = RunUnderTest(store)
    old.given(old.start(workflow(python("a"), python("b", "a"))))
    new = RunUnderTest(store)
    new.given(new.start(workflow(python("a"), python("c", "a"), version=2)))

    assert old.when(old.succeeded("a")) == ["AttemptStarted a", "NodeSucceeded a", "NodeScheduled b#1"]
    assert new.when(new.succeeded("a")) == ["AttemptStarted a", "NodeSucceeded a", "NodeScheduled c#1"]
    assert store.run(old.run_id).workflow_version == 1
    assert store.workflow("spec").latest_version() == 2


def test_a_start_by_name_runs_the_latest_or_the_requested_version(store: RunStore) -> None:
    store.deploy(parse_definition(workflow(python("v1"))))
    store.deploy(parse_definition(workflow(python("v2"), version=2)))
    latest, pinned = RunUnderTest(store), RunUnderTest(store)

    latest_events = latest.when(latest.command("StartRun", {"workflow": "spec"}))
    pinned_events = pinned.when(pinned.command("StartRun", {"workflow": "spec", "workflow_version": 1}))

    assert latest_events == ["Started", "NodeScheduled v2#1"]
    assert pinned_events == ["Started", "NodeScheduled v1#1"]


def test_a_start_by_name_sees_a_version_deployed_through_another_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/es.db"
    worker, gateway = RunStore(url), RunStore(url)
    gateway.deploy(parse_definition(workflow(python("v1"))))
    before = RunUnderTest(worker)
    before.given(before.command("StartRun", {"workflow": "spec"}))
    gateway.deploy(parse_definition(workflow(python("v2"), version=2)))
    latest, pinned = RunUnderTest(worker), RunUnderTest(worker)

    latest_events = latest.when(latest.command("StartRun", {"workflow": "spec"}))
    pinned_events = pinned.when(pinned.command("StartRun", {"workflow": "spec", "workflow_version": 2}))

    assert latest_events == ["Started", "NodeScheduled v2#1"]
    assert pinned_events == ["Started", "NodeScheduled v2#1"]


def test_a_start_pinning_a_version_that_does_not_exist_is_rejected(store: RunStore) -> None:
    store.deploy(parse_definition(workflow(python("v1"))))
    run = RunUnderTest(store)

    run.when(run.command("StartRun", {"workflow": "spec", "workflow_version": 4}))

    assert run.outcome == "rejected"
    assert "no version 4" in run.reason


# ---- snapshots and time travel ------------------------------------------------

CHAIN = workflow(
    *(python(f"n{i}", *([f"n{i - 1}"] if i else [])) for i in range(8)),
    outputs={"last": "n7"},
)


def play_chain(url: str, run_id: str, snapshot_interval: int) -> None:
    """Run CHAIN to its end, each command through a new store so that each decide loads the run."""
    for index in range(-1, 8):
        store = RunStore(url, snapshot_interval=snapshot_interval)
        run = RunUnderTest(store, run_id)
        run.when(run.start(CHAIN) if index < 0 else run.succeeded(f"n{index}", index))
        assert run.outcome == "applied"
        store.close()


def test_a_long_run_loads_correctly_from_snapshots(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/es.db"
    run_id = str(uuid.uuid4())

    play_chain(url, run_id, snapshot_interval=5)

    store = RunStore(url, snapshot_interval=5)
    assert store.snapshots is not None
    snapshots = list(store.snapshots.get(uuid.UUID(run_id)))
    assert [s.originator_version for s in snapshots] == [5, 10, 15, 20, 25]
    state = store.run(run_id)
    assert (state.status, state.outputs) == ("completed", {"last": 7})
    assert state.version == len(store.run_events(run_id)) == 26
    assert all(n["status"] == "succeeded" for n in state.nodes.values())


def test_a_run_at_a_past_version_is_the_state_its_first_events_describe(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/es.db"
    run_id = str(uuid.uuid4())
    play_chain(url, run_id, snapshot_interval=5)
    store = RunStore(url, snapshot_interval=5)
    events = store.run_events(run_id)

    for version in range(1, len(events) + 1):
        past = store.run(run_id, version=version)
        so_far = [summary(e) for e in events[:version]]
        succeeded = {line.split()[1] for line in so_far if line.startswith("NodeSucceeded")}
        assert past.version == version
        assert {n for n, s in past.nodes.items() if s["status"] == "succeeded"} == succeeded
        assert past.status == ("completed" if "Completed" in so_far else "running")


def test_a_run_reads_the_same_with_and_without_snapshots(tmp_path: Path) -> None:
    with_snapshots, without = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    run_id = str(uuid.uuid4())
    play_chain(with_snapshots, run_id, snapshot_interval=5)
    play_chain(without, run_id, snapshot_interval=1000)

    for version in (4, 5, 6, 12, 18, 26):
        a = RunStore(with_snapshots, snapshot_interval=5).run(run_id, version=version)
        b = RunStore(without, snapshot_interval=1000).run(run_id, version=version)
        assert (a.version, a.status, a.nodes, a.timers) == (b.version, b.status, b.nodes, b.timers)
        assert len(a.applied) == len(b.applied)


def test_an_unknown_run_cannot_be_read(store: RunStore) -> None:
    with pytest.raises(KeyError, match="no run"):
        store.run(str(uuid.uuid4()))
