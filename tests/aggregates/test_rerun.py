"""Rerun from a step: a new run, linked to the original, that reuses the outputs of the nodes
upstream of the chosen node and executes from it on."""

from __future__ import annotations

from typing import Any

from aggregates.store import RunStore
from schemas.definition import parse_definition
from schemas.envelope import Envelope
from tests.aggregates.support import NOW, RunUnderTest, python, workflow

# a -> b -> c, and d on its own
PIPELINE = workflow(
    python("a"),
    python("b", "a", inputs={"x": "a.n"}),
    python("c", "b", inputs={"x": "b.n"}),
    python("d"),
    name="pipeline",
    outputs={"c": "c"},
)


def finished_original(store: RunStore) -> RunUnderTest:
    original = RunUnderTest(store)
    original.given(
        original.start(PIPELINE, {"order": 7}),
        original.succeeded("a", {"n": 1}),
        original.succeeded("b", {"n": 2}),
        original.succeeded("d", "side"),
        original.failed("c", "RuntimeError", "bug in c"),
    )
    return original


def rerun(original: RunUnderTest, from_node: str, definition: str = "original", **envelope: Any) -> Envelope:
    payload = {"rerun": {"run_id": original.run_id, "from_node": from_node, "definition": definition}}
    return Envelope.new("StartRun", RunUnderTest(original.store).run_id, payload, **envelope)


def test_a_rerun_reuses_the_upstream_outputs_and_executes_from_the_node_on(store: RunStore) -> None:
    original = finished_original(store)
    again = RunUnderTest(store)
    events = again.when(again.command("StartRun", rerun(original, "c").payload))
    assert again.outcome == "applied", again.reason
    assert events == ["Started", "NodeReused a", "NodeReused b", "NodeScheduled c#1", "NodeScheduled d#1"]
    assert again.last("NodeScheduled").node_id == "d"  # not upstream of c: executed again
    scheduled_c = [e for e in again.events() if type(e).__name__ == "NodeScheduled" and e.node_id == "c"]
    assert scheduled_c[0].inputs == {"x": 2}
    started = again.events()[0]
    assert started.rerun_of == {"run_id": original.run_id, "from_node": "c"}
    assert started.input == {"order": 7}


def test_a_rerun_can_take_the_current_definition_of_the_workflow(store: RunStore) -> None:
    original = finished_original(store)
    newer = {**PIPELINE, "version": 2, "outputs": {"c": "c", "d": "d"}}
    store.deploy(parse_definition(newer))
    again = RunUnderTest(store)
    again.when(again.command("StartRun", rerun(original, "c", "current").payload))
    assert again.outcome == "applied", again.reason
    assert store.run(again.run_id).workflow_version == 2
    assert store.run(original.run_id).workflow_version == 1


def test_a_rerun_from_a_node_the_definition_lacks_is_rejected_naming_it(store: RunStore) -> None:
    original = finished_original(store)
    again = RunUnderTest(store)
    again.when(again.command("StartRun", rerun(original, "zzz").payload))
    assert (again.outcome, again.reason) == (
        "rejected",
        "workflow 'pipeline' version 1 has no node 'zzz'",
    )


def test_a_rerun_needs_the_upstream_nodes_finished_in_the_original(store: RunStore) -> None:
    original = RunUnderTest(store)
    original.given(original.start(PIPELINE), original.succeeded("a", {"n": 1}))
    again = RunUnderTest(store)
    again.when(again.command("StartRun", rerun(original, "c").payload))
    assert again.outcome == "rejected"
    assert (
        again.reason
        == f"cannot rerun run {original.run_id} from 'c': upstream node(s) 'b' did not finish in it"
    )


def test_a_rerun_of_another_tenants_run_finds_no_such_run(store: RunStore) -> None:
    original = finished_original(store)
    verdict = store.decide([rerun(original, "c", tenant="intruder")], NOW)[0]
    assert (verdict.outcome, verdict.reason) == ("rejected", f"no run {original.run_id} to rerun")
