"""Bad input gets a dead letter with a reason that names the problem, and the worker keeps going."""

from __future__ import annotations

import asyncio
import uuid

from citadel.runs import follow, start_command
from schemas.envelope import Envelope, encode
from streams.engine import Engine
from streams.kafka import COMMANDS, NODE_TASKS
from tests.e2e.kafka_tools import dead_letters, publish
from tests.e2e.test_examples import example, run_to_end


async def test_garbage_and_illegal_commands_are_dead_lettered_while_runs_complete(engine: Engine) -> None:
    kafka = engine.settings.kafka
    finished = await run_to_end(engine, example("linear.yaml"), {"n": 1})
    unknown_run = str(uuid.uuid4())
    bad_definition = {"name": "broken", "nodes": [{"id": "a", "type": "teleport"}]}

    await publish(kafka, COMMANDS, b"k1", b"\x00\xffnot json")
    await publish(kafka, COMMANDS, b"k2", b'{"type": "StartRun"}')
    await publish(
        kafka, COMMANDS, unknown_run.encode(), encode(Envelope.new("CancelRun", unknown_run, {"reason": "x"}))
    )
    await publish(
        kafka, COMMANDS, finished.run_id.encode(), encode(Envelope.new("CancelRun", finished.run_id))
    )
    await publish(
        kafka,
        COMMANDS,
        finished.run_id.encode(),
        encode(
            Envelope.new(
                "NodeSucceeded", finished.run_id, {"node_id": "square", "attempt_id": "nope", "output": 1}
            )
        ),
    )
    bad_start = start_command(bad_definition, {}, "acme")
    await publish(kafka, COMMANDS, bad_start.run_id.encode(), encode(bad_start))
    await publish(kafka, NODE_TASKS, b"k3", b"[1, 2, 3]")

    # The worker is still deciding: a good run submitted after all of that completes.
    after = await run_to_end(engine, example("linear.yaml"), {"n": 2})
    assert after.status == "completed"

    letters = await dead_letters(kafka, 7)
    reasons = [letter["reason"] for letter in letters]
    assert any(r.startswith("undecodable command: not JSON") for r in reasons)
    assert any("invalid envelope" in r and "id" in r for r in reasons)
    assert any(f"CancelRun for unknown run {unknown_run}" in r for r in reasons)
    assert any("is already completed; it cannot be cancelled" in r for r in reasons)
    assert any("has no attempt 'nope' of node 'square'" in r for r in reasons)
    assert any("nodes.a.type: unknown node type 'teleport'" in r for r in reasons)
    assert any(r.startswith("undecodable node task") for r in reasons)
    garbage = next(letter for letter in letters if letter["key"] == "k1")
    assert garbage["value_base64"] is not None and garbage["topic"] == COMMANDS


async def test_a_run_rejected_by_the_engine_is_reported_to_the_submitter(engine: Engine) -> None:
    from streams.watch import CommandRejected

    definition = example("linear.yaml")
    command = start_command(definition, {"n": "not a number"}, "acme")
    await engine.submit(command)
    try:
        await asyncio.wait_for(follow(engine.settings.kafka, command.run_id, command.id), 30)
    except CommandRejected as exc:
        assert "input.n" in str(exc) and "is not of type 'integer'" in str(exc)
    else:
        raise AssertionError("the run should have been rejected")


UNRECORDABLE = """
name: unrecordable
version: 1
nodes:
  - id: huge
    type: python
    retry: {max_attempts: 1}
    config:
      code: |
        def main():
            return {"n": 2**64}
"""


async def test_a_result_that_cannot_be_recorded_fails_its_run_and_other_runs_go_on(engine: Engine) -> None:
    """An integer past 64 bits used to be decided, then never encoded: the run waited for ever and
    the worker lost an executor loop with each such attempt."""
    from schemas.definition import parse_definition

    definition = parse_definition(UNRECORDABLE).model_dump(mode="json")
    failed = await run_to_end(engine, definition, {})
    assert failed.status == "failed"
    node = failed.nodes["huge"]
    assert node.status == "failed"
    assert "returned a result the engine cannot record, at output.n: the integer" in (failed.error or "")

    # The same worker, all its executor loops intact, completes the next runs.
    after = await asyncio.gather(*(run_to_end(engine, example("linear.yaml"), {"n": n}) for n in range(4)))
    assert [report.status for report in after] == ["completed"] * 4
