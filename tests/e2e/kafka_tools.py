"""Small helpers for tests that talk to the broker directly, as another program would."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from streams.kafka import DEAD_LETTERS, KafkaSettings
from streams.watch import topic_reader


async def publish(kafka: KafkaSettings, topic: str, key: bytes | None, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(kafka.topic(topic), value, key=key)
    finally:
        await producer.stop()


async def read_until(
    kafka: KafkaSettings, topic: str, done: Callable[[list[Any]], bool], timeout: float = 30.0
) -> list[Any]:
    """Read `topic` from the beginning until `done(messages)` holds."""
    consumer = topic_reader(kafka, topic)
    await consumer.start()
    messages: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while not done(messages):
                batch = await consumer.getmany(timeout_ms=100)
                for records in batch.values():
                    messages.extend(records)
    finally:
        await consumer.stop()
    return messages


async def dead_letters(kafka: KafkaSettings, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    messages = await read_until(kafka, DEAD_LETTERS, lambda m: len(m) >= count, timeout)
    return [orjson.loads(m.value) for m in messages]
