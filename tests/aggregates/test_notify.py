"""A run that ends schedules its outgoing webhooks; each attempt's outcome is an event, retried
after the target's backoff until delivered or its attempts are spent."""

from __future__ import annotations

import datetime as dt
from typing import Any

from tests.aggregates.support import NOW, RunUnderTest, python, transform, workflow

HOOK = "https://example.test/hook"


def notifying(*targets: dict[str, Any], node: dict[str, Any] | None = None) -> dict[str, Any]:
    return workflow(node or transform("t", "1"), notify=list(targets))


def attempted(
    run: RunUnderTest,
    attempt: int,
    status: int | None,
    error: str | None = None,
    error_class: str | None = None,
) -> Any:
    delivery = f"{run.run_id}:notify:0"
    outcome = {"status_code": status, "error_class": error_class, "error": error}
    return run.command(
        "NotificationAttempted",
        {"delivery_id": delivery, "attempt": attempt, **outcome},
        id=f"{delivery}:{attempt}:attempted",
    )


def test_a_run_that_ends_schedules_a_delivery_to_each_target_asking_for_that_end(run: RunUnderTest) -> None:
    events = run.when(run.start(notifying({"url": HOOK}, {"url": "https://other.test/", "on": ["failed"]})))
    assert events[-2:] == ["Completed", "NotificationsScheduled"]
    (scheduled,) = [e for e in run.events() if type(e).__name__ == "NotificationsScheduled"]
    assert list(scheduled.deliveries) == [f"{run.run_id}:notify:0"]  # the second wants failures only
    assert scheduled.deliveries[f"{run.run_id}:notify:0"]["url"] == HOOK


def test_a_run_without_targets_for_its_end_schedules_nothing(run: RunUnderTest) -> None:
    events = run.when(run.start(notifying({"url": HOOK, "on": ["cancelled"]}, node=python("p"))))
    events += run.when(run.failed("p"))
    assert events[-1] == "Failed p"


def test_failed_attempts_retry_with_backoff_until_one_is_delivered(run: RunUnderTest) -> None:
    policy = {"max_attempts": 3, "delay_seconds": 2, "jitter": 0}
    run.given(run.start(notifying({"url": HOOK, "retry": policy})))
    assert run.when(attempted(run, 1, 503)) == ["NotificationAttempted"]
    first = run.last("NotificationAttempted")
    assert (first.outcome, first.status_code, first.outstanding) == ("retrying", 503, 1)
    assert first.next_attempt_at == (NOW + dt.timedelta(seconds=2)).isoformat()
    run.when(attempted(run, 2, None, "ConnectError: refused"))
    second = run.last("NotificationAttempted")
    assert (second.outcome, second.error, second.next_attempt_at) == (
        "retrying",
        "ConnectError: refused",
        (NOW + dt.timedelta(seconds=4)).isoformat(),
    )
    run.when(attempted(run, 3, 204))
    third = run.last("NotificationAttempted")
    assert (third.outcome, third.next_attempt_at, third.outstanding) == ("delivered", None, 0)
    assert run.store.run(run.run_id).pending_deliveries() == {}


def test_the_last_allowed_attempt_failing_gives_the_delivery_up(run: RunUnderTest) -> None:
    run.given(run.start(notifying({"url": HOOK, "retry": {"max_attempts": 2}})))
    run.when(attempted(run, 1, 500))
    run.when(attempted(run, 2, 500))
    last = run.last("NotificationAttempted")
    assert (last.outcome, last.next_attempt_at, last.outstanding) == ("failed", None, 0)


def test_news_of_an_attempt_already_recorded_changes_nothing(run: RunUnderTest) -> None:
    run.given(run.start(notifying({"url": HOOK})), attempted(run, 1, 500))
    assert run.when(attempted(run, 1, 500)) == []
    assert run.outcome == "duplicate"
    stale = run.command(
        "NotificationAttempted", {"delivery_id": f"{run.run_id}:notify:0", "attempt": 1, "status_code": 200}
    )
    assert run.when(stale) == []  # another id, same attempt: the run has moved on to attempt 2


def test_a_client_error_answer_other_than_429_is_given_up_at_once(run: RunUnderTest) -> None:
    run.given(run.start(notifying({"url": HOOK, "retry": {"max_attempts": 5}})))
    run.when(attempted(run, 1, 400, "HTTP 400 Bad Request", "HTTPStatus"))
    last = run.last("NotificationAttempted")
    assert (last.outcome, last.error_class, last.next_attempt_at, last.outstanding) == (
        "failed",
        "HTTPStatus",
        None,
        0,
    )


def test_a_429_answer_is_retried(run: RunUnderTest) -> None:
    run.given(run.start(notifying({"url": HOOK, "retry": {"max_attempts": 5}})))
    run.when(attempted(run, 1, 429, "HTTP 429 Too Many Requests", "HTTPStatus"))
    assert run.last("NotificationAttempted").outcome == "retrying"


def test_a_failure_of_a_class_retry_on_does_not_list_is_given_up_at_once(run: RunUnderTest) -> None:
    policy = {"max_attempts": 5, "retry_on": ["Timeout"]}
    run.given(run.start(notifying({"url": HOOK, "retry": policy})))
    run.when(attempted(run, 1, None, "ReadTimeout: timed out", "Timeout"))
    assert run.last("NotificationAttempted").outcome == "retrying"
    run.when(attempted(run, 2, 503, "HTTP 503 Service Unavailable", "HTTPStatus"))
    last = run.last("NotificationAttempted")
    assert (last.attempt, last.outcome, last.outstanding) == (2, "failed", 0)
