"""Small helpers for tests that talk to the broker directly, as another program would."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

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


async def read_all(kafka: KafkaSettings, topic: str, timeout: float = 30.0) -> list[Any]:
    """Everything on one of the engine's topics so far: marks the end of each partition with a
    message of our own, then reads up to the marks (the broker's end offsets are not reliable)."""
    mark = f"end-of-read-{uuid.uuid4().hex}".encode()
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:
        for partition in range(kafka.partitions):
            await producer.send_and_wait(kafka.topic(topic), mark, key=mark, partition=partition)
    finally:
        await producer.stop()
    messages = await read_until(
        kafka, topic, lambda m: sum(1 for x in m if x.key == mark) >= kafka.partitions, timeout
    )
    return [m for m in messages if m.key != mark]


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def group_offsets(kafka: KafkaSettings, group: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer of `group` that never joins it: it reads and sets the group's committed
    offsets (the admin client's OffsetFetch does not speak the embedded broker's version)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def wait_committed(
    kafka: KafkaSettings, group: str, topic: str, offset: int, timeout: float = 120.0
) -> None:
    """Until `group` has committed at least `offset` on partition 0 of a user topic."""
    async with group_offsets(kafka, group) as consumer, asyncio.timeout(timeout):
        while (await consumer.committed(TopicPartition(topic, 0)) or -1) < offset:
            await asyncio.sleep(0.1)


async def committed(kafka: KafkaSettings, group: str, topic: str) -> int:
    """What `group` has committed on partition 0 of a user topic (-1: nothing)."""
    async with group_offsets(kafka, group) as consumer:
        return await consumer.committed(TopicPartition(topic, 0)) or -1


async def reset_offsets(kafka: KafkaSettings, group: str, topic: str) -> None:
    """Commit offset 0 for `group` on partition 0 of a user topic, so it reads everything again."""
    async with group_offsets(kafka, group) as consumer:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.commit({partition: 0})
