"""Commands published by other programs: a program that only speaks Kafka starts, signals and
cancels runs; what it gets wrong becomes dead letters with reasons, and the worker goes on."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from typing import Any

import orjson
from jsonschema import Draft202012Validator

from citadel.runs import follow
from schemas.definition import parse_definition
from schemas.envelope import command_json_schema
from streams.engine import Engine
from streams.kafka import COMMANDS
from streams.watch import watch_run
from tests.conftest import EXAMPLES
from tests.e2e.kafka_tools import dead_letters, publish

CLIENT = EXAMPLES / "kafka_client.py"


async def client(engine: Engine, *args: str) -> str:
    """Run examples/kafka_client.py (aiokafka only) against the engine; the run id it prints."""
    kafka = engine.settings.kafka
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CLIENT),
        "--bootstrap",
        kafka.bootstrap,
        "--topic",
        kafka.topic(COMMANDS),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode().strip()


async def deploy_approval(engine: Engine, name: str) -> None:
    definition = parse_definition(
        {
            "name": name,
            "input": {"type": "object", "required": ["order"]},
            "nodes": [
                {"id": "approve", "type": "approval"},
                {
                    "id": "ship",
                    "type": "transform",
                    "needs": ["approve"],
                    "config": {"output": "input.order + ' approved by ' + approve.payload.by"},
                },
            ],
            "outputs": {"shipped": "ship"},
        }
    )
    assert engine.store is not None
    await engine._in_store(engine.store.deploy, definition)


async def until_waiting_for_approval(engine: Engine, run_id: str) -> None:
    async with contextlib.aclosing(watch_run(engine.settings.kafka, run_id)) as events:
        async for event in events:
            if event.type == "ApprovalRequested":
                return


async def test_a_program_that_only_speaks_kafka_starts_signals_and_cancels_runs(engine: Engine) -> None:
    await deploy_approval(engine, "default.approvals")

    approved = await client(engine, "start", "default.approvals", '{"order": "A-1"}')
    await asyncio.wait_for(until_waiting_for_approval(engine, approved), 30)
    await client(engine, "signal", approved, "approve", '{"by": "ann"}')
    cancelled = await client(engine, "start", "default.approvals", '{"order": "A-2"}')
    await asyncio.wait_for(until_waiting_for_approval(engine, cancelled), 30)
    await client(engine, "cancel", cancelled, "--reason", "customer called")

    report = await asyncio.wait_for(follow(engine.settings.kafka, approved), 30)
    assert (report.status, report.outputs) == ("completed", {"shipped": "A-1 approved by ann"})
    report = await asyncio.wait_for(follow(engine.settings.kafka, cancelled), 30)
    assert (report.status, report.error) == ("cancelled", "customer called")


def command(kind: str, run_id: str, payload: Any, **fields: Any) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "type": kind,
        "run_id": run_id,
        "tenant": "default",
        "time": "2030-01-01T00:00:00Z",
        "payload": payload,
        **fields,
    }


async def test_garbage_and_schema_invalid_commands_become_dead_letters_and_a_valid_one_still_runs(
    engine: Engine,
) -> None:
    await deploy_approval(engine, "default.gate")
    kafka = engine.settings.kafka
    run = str(uuid.uuid4())
    invalid = {
        "bad-input": command("StartRun", str(uuid.uuid4()), {"workflow": "default.gate", "input": "A-1"}),
        "no-node": command("Signal", str(uuid.uuid4()), {"payload": 1}),
        "teleport": command("Teleport", str(uuid.uuid4()), {}),
        "no-run-id": command("CancelRun", str(uuid.uuid4()), {}),
        "future": command("CancelRun", str(uuid.uuid4()), {}, schema_version=99),
    }
    # Keyed by run id, as a command should be; a dead letter keeps the key.
    keys = {case: document["run_id"] for case, document in invalid.items()}
    del invalid["no-run-id"]["run_id"]
    schema = Draft202012Validator(command_json_schema())
    assert not any(schema.is_valid(document) for document in invalid.values())

    await publish(kafka, COMMANDS, b"garbage", b"\x00\xff{not json")
    for case, document in invalid.items():
        await publish(kafka, COMMANDS, keys[case].encode(), orjson.dumps(document))
    valid = command("StartRun", run, {"workflow": "default.gate", "input": {"order": "A-3"}})
    assert schema.is_valid(valid)
    await publish(kafka, COMMANDS, run.encode(), orjson.dumps(valid))
    await asyncio.wait_for(until_waiting_for_approval(engine, run), 30)
    signal = command("Signal", run, {"node_id": "approve", "payload": {"by": "bo"}})
    await publish(kafka, COMMANDS, run.encode(), orjson.dumps(signal))

    report = await asyncio.wait_for(follow(kafka, run), 30)
    assert (report.status, report.outputs) == ("completed", {"shipped": "A-3 approved by bo"})
    letters = await dead_letters(kafka, 6)
    by_key = {letter["key"]: letter["reason"] for letter in letters}
    reasons = {case: by_key[key] for case, key in {**keys, "garbage": "garbage"}.items()}
    assert reasons["garbage"].startswith("undecodable command: not JSON")
    assert reasons["bad-input"].startswith("invalid StartRun: payload.input: ")
    assert reasons["no-node"].startswith("invalid Signal: payload.node_id: Field required")
    assert reasons["teleport"].startswith("unknown command type 'Teleport'")
    assert "run_id: Field required" in reasons["no-run-id"]
    assert "schema_version 99 is newer than this engine understands" in reasons["future"]
