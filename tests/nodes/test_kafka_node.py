"""The `kafka` node through the real broker: it publishes one message with the key, headers and
value its expressions give, marked with its attempt id, and outputs where the message went."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from schemas.definition import parse_definition
from streams.engine import Engine
from tests.e2e.test_examples import run_to_end


def shipping(topic: str, key: str = "input.order") -> dict[str, Any]:
    return parse_definition(
        {
            "name": f"ship-{topic}",
            "nodes": [
                {
                    "id": "publish",
                    "type": "kafka",
                    "config": {
                        "topic": topic,
                        "key": key,
                        "headers": {"source": "'citadel'", "amount": "input.amount"},
                        "value": "{'order': input.order, 'total': input.amount * 2.0}",
                    },
                }
            ],
            "outputs": {"published": "publish"},
        }
    ).model_dump(mode="json")


async def read_one(bootstrap: str, topic: str) -> Any:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", fetch_max_wait_ms=20
    )
    await consumer.start()
    try:
        return await asyncio.wait_for(consumer.getone(), 30)
    finally:
        await consumer.stop()


async def test_a_kafka_node_publishes_the_mapped_message_with_its_attempt_id(engine: Engine) -> None:
    topic = f"shipped-{uuid.uuid4().hex[:8]}"

    report = await run_to_end(engine, shipping(topic), {"order": "A-1", "amount": 12.5})

    assert report.status == "completed", report.error
    message = await read_one(engine.settings.kafka.bootstrap, topic)
    assert report.outputs == {"published": {"topic": topic, "partition": message.partition, "offset": 0}}
    assert message.key == b"A-1"
    assert orjson.loads(message.value) == {"order": "A-1", "total": 25.0}
    assert dict(message.headers) == {
        "source": b"citadel",
        "amount": b"12.5",
        "citadel-attempt-id": f"{report.run_id}:publish:1".encode(),
    }


async def test_a_kafka_node_whose_expression_fails_fails_naming_the_field(engine: Engine) -> None:
    report = await run_to_end(
        engine, shipping("never-written", key="input.missing"), {"order": "A-2", "amount": 1}
    )

    assert report.status == "failed"
    assert report.nodes["publish"].error is not None
    assert "config.key: " in report.nodes["publish"].error
