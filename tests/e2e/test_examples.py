"""Every example in examples/ runs to completion through the real broker, with the right outputs."""

from __future__ import annotations

import asyncio
from typing import Any

from citadel.runs import RunReport, follow, start_command
from schemas.definition import parse_definition
from streams.engine import Engine
from tests.conftest import EXAMPLES


def example(name: str) -> dict[str, Any]:
    return parse_definition((EXAMPLES / name).read_text()).model_dump(mode="json")


async def run_to_end(engine: Engine, definition: dict[str, Any], run_input: dict[str, Any]) -> RunReport:
    command = start_command(definition, run_input, tenant="acme")
    await engine.submit(command)
    return await asyncio.wait_for(follow(engine.settings.kafka, command.run_id, command.id), 60)


async def test_linear_pipeline_passes_values_from_node_to_node(engine: Engine) -> None:
    report = await run_to_end(engine, example("linear.yaml"), {"n": 5})
    assert report.status == "completed", report.error
    assert report.outputs == {"result": 101, "note": "100 plus one"}
    assert [n.status for n in report.nodes.values()] == ["succeeded"] * 4


async def test_diamond_runs_both_branches_and_joins_when_condition_holds(engine: Engine) -> None:
    report = await run_to_end(engine, example("diamond.yaml"), {"items": [50, 70.5, 3]})
    assert report.status == "completed", report.error
    assert report.outputs == {"mean": 123.5 / 3, "label": "big"}
    assert report.nodes["big"].status == "succeeded"


async def test_diamond_skips_the_guarded_branch_and_still_joins(engine: Engine) -> None:
    report = await run_to_end(engine, example("diamond.yaml"), {"items": [1, 2]})
    assert report.status == "completed", report.error
    assert report.outputs == {"mean": 1.5, "label": "small"}
    assert report.nodes["big"].status == "skipped"
    assert report.nodes["join"].status == "succeeded"


async def test_flaky_node_retries_with_backoff_then_succeeds(engine: Engine) -> None:
    report = await run_to_end(engine, example("retry.yaml"), {"order": "A-17"})
    assert report.status == "completed", report.error
    assert report.outputs == {"message": "order A-17 shipped after 3 attempts"}
    assert report.nodes["fetch"].attempts == 3
    failures = [e for e in report.events if e.type == "NodeFailed"]
    assert [f.payload["error_class"] for f in failures] == ["ConnectionError", "ConnectionError"]
    retries = [e for e in report.events if e.type == "RetryScheduled"]
    assert len(retries) == 2
    # Each retry waited at least its (jittered) delay before the next attempt was scheduled.
    scheduled = [e for e in report.events if e.type == "NodeScheduled" and e.payload["node_id"] == "fetch"]
    for retry, next_attempt in zip(retries, scheduled[1:], strict=True):
        waited = (next_attempt.time - retry.time).total_seconds()
        assert waited >= retry.payload["delay_seconds"] * 0.9


async def test_many_runs_at_once_all_complete(engine: Engine) -> None:
    reports = await asyncio.gather(
        *(run_to_end(engine, example("linear.yaml"), {"n": n}) for n in range(150))
    )
    assert [r.outputs["result"] for r in reports] == [(2 * n) ** 2 + 1 for n in range(150)]


async def test_runs_of_slow_nodes_outnumbering_the_executors_all_complete(engine: Engine) -> None:
    """More attempts than executor slots: some start on this worker at once, the rest wait in
    Kafka; every one runs and reports exactly once."""
    slow = parse_definition(
        {
            "name": "slow",
            "nodes": [
                {
                    "id": "a",
                    "type": "python",
                    "config": {
                        "inputs": {"n": "input.n"},
                        "code": "import time\ndef main(n):\n    time.sleep(0.05)\n    return n + 1",
                    },
                },
                {
                    "id": "b",
                    "type": "python",
                    "needs": ["a"],
                    "config": {
                        "inputs": {"n": "a"},
                        "code": "import time\ndef main(n):\n    time.sleep(0.05)\n    return n * 10",
                    },
                },
            ],
            "outputs": {"result": "b"},
        }
    ).model_dump(mode="json")
    reports = await asyncio.gather(*(run_to_end(engine, slow, {"n": n}) for n in range(40)))
    assert [r.outputs["result"] for r in reports] == [(n + 1) * 10 for n in range(40)]
    assert all(n.attempts == 1 for r in reports for n in r.nodes.values())


async def test_a_long_attempt_is_seen_as_started_while_it_runs(engine: Engine) -> None:
    """Quick attempts have their start implied by the result; a long one is reported as started
    while it is still running, so watchers see it running."""
    sleepy = parse_definition(
        {
            "name": "sleepy",
            "nodes": [
                {
                    "id": "nap",
                    "type": "python",
                    "config": {"code": "import time\ndef main():\n    time.sleep(0.6)\n    return 1"},
                }
            ],
        }
    ).model_dump(mode="json")
    report = await run_to_end(engine, sleepy, {})
    started = next(e for e in report.events if e.type == "AttemptStarted")
    succeeded = next(e for e in report.events if e.type == "NodeSucceeded")
    assert (succeeded.time - started.time).total_seconds() >= 0.3


async def test_a_javascript_node_runs_in_a_v8_isolate_between_python_nodes(engine: Engine) -> None:
    mixed = parse_definition(
        {
            "name": "mixed",
            "nodes": [
                {
                    "id": "words",
                    "type": "python",
                    "config": {
                        "inputs": {"text": "input.text"},
                        "code": "def main(text):\n    return text.split()",
                    },
                },
                {
                    "id": "shout",
                    "type": "javascript",
                    "needs": ["words"],
                    "config": {
                        "inputs": {"words": "words"},
                        "code": "function main({words}) {\n"
                        "  console.log(words.length);\n"
                        "  return words.map(w => w.toUpperCase());\n"
                        "}",
                    },
                },
            ],
            "outputs": {"shouted": "shout"},
        }
    ).model_dump(mode="json")
    report = await run_to_end(engine, mixed, {"text": "hello brave world"})
    assert report.status == "completed", report.error
    assert report.outputs == {"shouted": ["HELLO", "BRAVE", "WORLD"]}
    succeeded = next(
        e for e in report.events if e.type == "NodeSucceeded" and e.payload["node_id"] == "shout"
    )
    assert succeeded.payload["stdout"].strip() == "3"


async def test_a_failing_node_routes_to_its_error_handler_through_the_broker(engine: Engine) -> None:
    routed = parse_definition(
        {
            "name": "routed",
            "nodes": [
                {
                    "id": "charge",
                    "type": "python",
                    "on_error": {"handler": "refund"},
                    "config": {"code": "def main():\n    raise RuntimeError('card declined')"},
                },
                {
                    "id": "refund",
                    "type": "python",
                    "needs": ["charge"],
                    "config": {
                        "inputs": {"why": "charge.message"},
                        "code": "def main(why):\n    return 'refunded: ' + why",
                    },
                },
                {"id": "ship", "type": "transform", "needs": ["charge"], "config": {"output": "'shipped'"}},
            ],
            "outputs": {"result": "refund"},
        }
    ).model_dump(mode="json")
    report = await run_to_end(engine, routed, {})
    assert report.status == "completed", report.error
    # The handler sees the executor's message: the exception's text, then the node's traceback.
    assert report.outputs["result"].startswith("refunded: card declined\n")
    assert report.nodes["ship"].status == "skipped"


async def test_saga_prices_every_item_in_order_and_ships(engine: Engine) -> None:
    report = await run_to_end(engine, example("saga.yaml"), {"items": ["ab", "cde", "f", "ghij"]})
    assert report.status == "completed", report.error
    assert report.outputs == {"total_cents": 1000, "tracking": "TRK-1"}
    prices = next(e for e in report.events if e.type == "NodeSucceeded" and e.payload["node_id"] == "prices")
    assert [line["line"] for line in prices.payload["output"]] == [1, 2, 3, 4]


async def test_saga_undoes_the_charge_then_the_reservation_when_shipping_fails(engine: Engine) -> None:
    report = await run_to_end(engine, example("saga.yaml"), {"items": ["ab"], "fail_shipping": True})
    assert report.status == "failed"
    assert "no carrier accepts the parcel" in (report.error or "")
    undone = [
        e.payload["output"]
        for e in report.events
        if e.type == "NodeSucceeded" and e.payload["node_id"].endswith(".compensate")
    ]
    assert undone == [{"refunded": "pay-1"}, "released res-ab"]
