"""Admission: attempts within their tenant's, workflow's and node type's limits go at once; the
rest wait per tenant and are released round-robin across tenants as attempts end."""

from __future__ import annotations

import tracemalloc
import uuid

import pytest

from streams.admission import Admission, Attempt, Limits


def attempt(
    tenant: str = "acme",
    n: int = 1,
    workflow: str = "flow",
    node_type: str = "python",
    run: str | None = None,
) -> Attempt:
    run_id = run or f"{tenant}-run-{n}"
    return Attempt(run_id, f"{run_id}:node{n}:1", tenant, workflow, node_type, version=n + 1)


def ids(attempts: list[Attempt]) -> list[str]:
    return [a.attempt_id for a in attempts]


def test_attempts_within_every_limit_go_at_once_and_are_counted_in_flight() -> None:
    admission = Admission(Limits(tenant=3))
    assert all(admission.offer(attempt(n=n)) for n in range(3))
    assert (admission.in_flight, admission.parked) == (3, 0)


def test_no_limits_admit_everything() -> None:
    admission = Admission(Limits())
    assert all(admission.offer(attempt(n=n)) for n in range(1000))


def test_over_the_tenant_limit_an_attempt_waits_until_one_of_the_tenant_ends() -> None:
    admission = Admission(Limits(tenant=2))
    first, second, third = attempt(n=1), attempt(n=2), attempt(n=3)
    assert admission.offer(first) and admission.offer(second)
    assert not admission.offer(third)
    assert (admission.in_flight, admission.parked, admission.waiting("acme")) == (2, 1, 1)
    # Another tenant has its own limit.
    assert admission.offer(attempt("globex", n=1))
    assert admission.end(first.run_id, first.attempt_id) == [third]
    assert (admission.in_flight, admission.parked, admission.waiting("acme")) == (3, 0, 0)


def test_a_workflow_at_its_limit_does_not_hold_back_the_tenants_other_workflows() -> None:
    admission = Admission(Limits(tenant=10, workflow=1))
    batch = attempt(n=1, workflow="batch")
    assert admission.offer(batch)
    assert not admission.offer(attempt(n=2, workflow="batch"))
    assert not admission.offer(attempt(n=3, workflow="batch"))
    assert admission.offer(attempt(n=4, workflow="report"))
    assert ids(admission.end(batch.run_id, batch.attempt_id)) == ["acme-run-2:node2:1"]


def test_a_node_type_limit_holds_across_tenants_and_leaves_other_types_alone() -> None:
    admission = Admission(Limits(node_types={"python": 2}))
    assert admission.offer(attempt("acme", n=1)) and admission.offer(attempt("globex", n=1))
    assert not admission.offer(attempt("initech", n=1))
    assert admission.offer(attempt("initech", n=2, node_type="http"))
    assert admission.parked == 1


def test_released_slots_go_round_robin_across_tenants_so_a_flood_does_not_starve_a_latecomer() -> None:
    admission = Admission(Limits(node_types={"python": 1}))
    flood = [attempt("acme", n=n) for n in range(6)]
    assert admission.offer(flood[0])
    assert not any(admission.offer(a) for a in flood[1:])
    late = [attempt("globex", n=n) for n in range(2)]
    assert not any(admission.offer(a) for a in late)
    order = []
    running = flood[0]
    while admission.in_flight:
        released = admission.end(running.run_id, running.attempt_id)
        if not released:
            break
        (running,) = released
        order.append(running)
    assert ids(order) == ids([flood[1], late[0], flood[2], late[1], flood[3], flood[4], flood[5]])


def test_a_tenants_waiting_attempts_go_oldest_first_across_its_workflows_and_types() -> None:
    admission = Admission(Limits(tenant=1))
    running = attempt(n=0)
    assert admission.offer(running)
    waiting = [
        attempt(n=1, workflow="a"),
        attempt(n=2, workflow="b", node_type="http"),
        attempt(n=3, workflow="a"),
        attempt(n=4, workflow="b"),
    ]
    assert not any(admission.offer(a) for a in waiting)
    order = []
    for _ in waiting:
        (running,) = admission.end(running.run_id, running.attempt_id)
        order.append(running)
    assert order == waiting


def test_an_attempt_that_ends_while_waiting_leaves_the_queue_and_frees_no_slot() -> None:
    admission = Admission(Limits(tenant=1))
    running, doomed, next_one = attempt(n=1), attempt(n=2), attempt(n=3)
    admission.offer(running)
    admission.offer(doomed)
    admission.offer(next_one)
    # An attempt whose inputs fail to evaluate is scheduled and failed in one decision.
    assert admission.end(doomed.run_id, doomed.attempt_id) == []
    assert (admission.in_flight, admission.parked) == (1, 1)
    assert admission.end(running.run_id, running.attempt_id) == [next_one]
    assert (admission.in_flight, admission.parked) == (1, 0)


def test_a_failed_or_cancelled_run_frees_all_its_slots_and_drops_its_waiting_attempts() -> None:
    admission = Admission(Limits(tenant=2))
    doomed = [attempt(n=n, run="doomed") for n in range(4)]
    assert [admission.offer(a) for a in doomed] == [True, True, False, False]
    other = attempt(n=9, run="other")
    assert not admission.offer(other)
    assert admission.end_run("doomed") == [other]
    assert (admission.in_flight, admission.parked) == (1, 0)
    # Late results of the ended run's attempts change nothing.
    assert admission.end("doomed", doomed[0].attempt_id) == []
    assert admission.in_flight == 1


def test_an_attempt_offered_again_is_counted_once_and_an_unknown_end_is_ignored() -> None:
    """A republished NodeScheduled: in flight, it is dispatched again (the batch that dispatched
    it may have failed to deliver it); waiting, it keeps its place."""
    admission = Admission(Limits(tenant=1))
    first, second = attempt(n=1), attempt(n=2)
    assert admission.offer(first)
    assert admission.offer(attempt(n=1))
    assert not admission.offer(second)
    assert not admission.offer(attempt(n=2))
    assert (admission.in_flight, admission.parked) == (1, 1)
    assert admission.end("nobody", "nobody:x:1") == []
    assert admission.end(first.run_id, first.attempt_id) == [second]
    assert admission.end(first.run_id, first.attempt_id) == []  # a result seen twice
    assert (admission.in_flight, admission.parked) == (1, 0)


def test_ten_thousand_waiting_attempts_take_a_few_megabytes_whatever_their_tasks_hold() -> None:
    """A parked attempt is its identity and the version of its event: the task (config, inputs)
    stays in the store until the attempt is released."""
    admission = Admission(Limits(tenant=1))
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for n in range(10_000):
            run_id = str(uuid.uuid4())
            admission.offer(Attempt(run_id, f"{run_id}:transform_items:1", "acme", "etl", "python", n + 2))
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert admission.parked == 9_999
    assert (after - before) / 10_000 < 800  # bytes per waiting attempt (measured: ~560)


@pytest.mark.parametrize("limits", [{"tenant": 0}, {"workflow": -1}, {"node_types": {"http": 0}}])
def test_a_limit_below_one_is_refused_with_a_message_naming_it(limits: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="concurrency limit is"):
        Limits(**limits)  # type: ignore[arg-type]
