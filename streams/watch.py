"""Follow one run's committed events on `citadel.run-events`, from its first event on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from schemas.envelope import Envelope, EnvelopeError, decode
from streams.kafka import COMMANDS, DEAD_LETTERS, RUN_EVENTS, FetchTuner, KafkaSettings, broker_partitions

TERMINAL = frozenset({"Completed", "Failed", "Cancelled"})


def topic_reader(kafka: KafkaSettings, topic: str) -> AIOKafkaConsumer:
    """A consumer of every partition of one of the engine's topics, from the beginning, in no
    group (it commits nothing and disturbs no worker). Start and stop it yourself."""
    return AIOKafkaConsumer(
        kafka.topic(topic),
        bootstrap_servers=kafka.bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=20,
    )


class CommandRejected(Exception):
    """The engine dead-lettered the command that was to start or change the run."""


async def watch_run(
    kafka: KafkaSettings, run_id: str, command_id: str | None = None
) -> AsyncIterator[Envelope]:
    """Yield the run's events in order, once each, until a terminal event (inclusive).

    With `command_id`, a dead letter for that command raises CommandRejected with its reason.
    """
    key = run_id.encode()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    # Quick while the run's events flow; slower in the lull of a long node, which it shares
    # the machine with.
    tuner = FetchTuner(kafka)
    tuner.register(consumer)
    tuner.activity()
    await consumer.start()
    tuning = asyncio.create_task(tuner.run())
    try:
        partitions = await broker_partitions(consumer, kafka, RUN_EVENTS)
        partition = DefaultPartitioner()(key, partitions, partitions)
        events = TopicPartition(kafka.topic(RUN_EVENTS), partition)
        dead = TopicPartition(kafka.topic(DEAD_LETTERS), partition)
        consumer.assign([events, dead])
        await consumer.seek_to_beginning(events, dead)
        seen = 0  # versions arrive in order; republished duplicates have versions already seen
        async for message in consumer:
            tuner.activity()
            if message.key != key:
                continue
            if message.topic == dead.topic:
                rejected = rejected_command(message.value)
                if command_id is not None and rejected is not None and rejected[0] == command_id:
                    raise CommandRejected(rejected[1])
                continue
            try:
                envelope = decode(message.value)
            except EnvelopeError:
                continue
            if envelope.version is None or envelope.version <= seen:
                continue
            seen = envelope.version
            yield envelope
            if envelope.type in TERMINAL:
                return
    finally:
        tuning.cancel()
        await consumer.stop()


def rejected_command(value: bytes | None) -> tuple[str, str] | None:
    """The id of the command a dead letter holds and the reason it was rejected; None for a
    letter of anything but a command."""
    try:
        letter = orjson.loads(value or b"{}")
        command_id = orjson.loads(letter.get("value") or "{}").get("id")
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return None
    if letter.get("topic") != COMMANDS or not isinstance(command_id, str):
        return None
    return command_id, str(letter.get("reason"))
