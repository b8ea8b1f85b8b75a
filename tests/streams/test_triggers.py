"""Kafka topic triggers through the real broker: each matching message on a user topic starts
exactly one run of the deployed workflow, with the mapped input; redelivery starts nothing new;
a new version takes over; messages that cannot be mapped become dead letters.

"Processed" is judged by the trigger group's committed offsets: the engine commits a message's
offset only once the broker has every StartRun and dead letter it caused.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord

from schemas.definition import parse_definition
from schemas.envelope import Envelope, EnvelopeError, decode
from streams.engine import Engine
from streams.kafka import COMMANDS, RUN_EVENTS, KafkaSettings, ensure_topics
from streams.triggers import TopicTriggers, TriggerFailed, start_command
from tests.conftest import EngineFactory, kafka_for
from tests.e2e.kafka_tools import dead_letters, read_all, read_until, reset_offsets, until, wait_committed

pytestmark = pytest.mark.timeout(300)


def orders(name: str, topic: str, version: int = 1, via: str = "v1") -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "input": {
            "type": "object",
            "required": ["order", "amount"],
            "properties": {"order": {"type": "string"}, "amount": {"type": "number"}},
        },
        "nodes": [{"id": "double", "type": "transform", "config": {"output": "input.amount * 2.0"}}],
        "outputs": {"doubled": "double"},
        "triggers": [
            {
                "topic": topic,
                "filter": "message.value.amount >= 10.0",
                "input": {
                    "order": "message.value.id",
                    "amount": "message.value.amount",
                    "customer": "message.key",
                    "source": "message.headers['source']",
                    "via": f"'{via}'",
                },
            }
        ],
    }


async def deploy(engine: Engine, document: dict[str, Any]) -> None:
    assert engine.store is not None
    await engine._in_store(engine.store.deploy, parse_definition(document))


async def user_topic(kafka: KafkaSettings, prefix: str = "") -> str:
    """A topic of the user's (not in the engine's namespace), with one partition: its order is
    the order the trigger consumer takes its messages in."""
    topic = f"{prefix}orders-{uuid.uuid4().hex[:8]}"
    await ensure_topics(KafkaSettings(bootstrap=kafka.bootstrap, partitions=1), (topic,))
    return topic


async def publish(kafka: KafkaSettings, topic: str, messages: list[tuple[bytes | None, bytes]]) -> int:
    """Publish (key, value) messages with a `source` header; the offset after the last one."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, linger_ms=5)
    await producer.start()
    try:
        deliveries = [
            await producer.send(topic, value, key=key, headers=[("source", b"shop")])
            for key, value in messages
        ]
        offsets = [(await d).offset for d in deliveries]
    finally:
        await producer.stop()
    return max(offsets) + 1


def order(order_id: str, amount: float) -> tuple[bytes, bytes]:
    return b"cust-" + order_id.encode(), orjson.dumps({"id": order_id, "amount": amount})


def mixed_orders(
    total: int, every: int, junk: int, filtered: tuple[int, ...], prefix: str
) -> tuple[list[tuple[bytes, bytes]], list[str]]:
    """`total` messages: of each `every`, the one at `junk` is not JSON and those at `filtered`
    fail the `orders` filter; the rest match. The messages, and the orders that match."""
    messages = []
    for n in range(total):
        if n % every == junk:
            messages.append((b"junk", b"{not json"))
        elif n % every in filtered:
            messages.append(order(f"{prefix}{n}", 1.0))
        else:
            messages.append(order(f"{prefix}{n}", 10.0 + n))
    matching = [f"{prefix}{n}" for n in range(total) if n % every not in (junk, *filtered)]
    return messages, matching


def decoded(messages: list[Any]) -> Iterator[Envelope]:
    for message in messages:
        try:
            yield decode(message.value)
        except EnvelopeError:
            continue


async def triggered_starts(kafka: KafkaSettings, workflow: str) -> list[Envelope]:
    """The StartRun commands the triggers published for `workflow` (all of them: the engine
    commits a message's offset only after its StartRun is on the commands topic)."""
    messages = await read_all(kafka, COMMANDS)
    return [c for c in decoded(messages) if c.type == "StartRun" and c.payload.get("workflow") == workflow]


async def started_runs(kafka: KafkaSettings, workflow: str, count: int) -> dict[str, Envelope]:
    """The Started events of `workflow`, by run id, once `count` runs have started."""

    def runs(messages: list[Any]) -> dict[str, Envelope]:
        return {
            e.run_id: e
            for e in decoded(messages)
            if e.type == "Started" and e.payload["workflow"] == workflow
        }

    return runs(await read_until(kafka, RUN_EVENTS, lambda m: len(runs(m)) >= count, timeout=120))


def record(value: bytes, offset: int = 0, timestamp: int = 1_000, key: bytes | None = None) -> Any:
    return ConsumerRecord(
        topic="orders",
        partition=0,
        offset=offset,
        timestamp=timestamp,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=len(value),
        headers=(),
    )


def whole_input(source: str) -> TopicTriggers:
    document = orders("acme.whole", "orders")
    document["triggers"] = [{"topic": "orders", "input": source}]
    definition = parse_definition(document)
    return TopicTriggers(definition, tuple(definition.triggers), since_ms=0)


def test_one_expression_may_give_the_whole_input_and_the_run_id_is_the_messages_own() -> None:
    triggers = whole_input("message.value")
    message = orjson.dumps({"order": "E-1", "amount": 3})

    command = start_command(triggers, record(message))

    assert command is not None and command.payload["input"] == {"order": "E-1", "amount": 3}
    assert (command.tenant, command.payload["workflow_version"]) == ("acme", 1)
    again = start_command(triggers, record(message))
    later = start_command(triggers, record(message, offset=1))
    reborn = start_command(triggers, record(message, timestamp=2))  # an emptied broker's offset 0
    assert again is not None and (again.run_id, again.id) == (command.run_id, command.id)
    assert later is not None and reborn is not None
    assert len({command.run_id, later.run_id, reborn.run_id}) == 3


def test_an_input_expression_that_gives_no_object_is_refused_by_name() -> None:
    with pytest.raises(TriggerFailed, match=r"of workflow 'acme.whole': input must give an object, got list"):
        start_command(whole_input("[message.offset]"), record(b"{}"))


async def test_each_matching_message_starts_one_run_with_the_mapped_input(engine: Engine) -> None:
    kafka = engine.settings.kafka
    topic = await user_topic(kafka)
    await deploy(engine, orders("acme.orders", topic))

    end = await publish(
        kafka,
        topic,
        [order("A-1", 12.5), order("A-2", 3.0), order("A-3", 10.0), order("A-4", 9.99), order("A-5", 40.0)],
    )
    await wait_committed(kafka, engine.triggers.group, topic, end)

    starts = await triggered_starts(kafka, "acme.orders")
    assert sorted(s.payload["input"]["order"] for s in starts) == ["A-1", "A-3", "A-5"]
    runs = await started_runs(kafka, "acme.orders", 3)
    assert sorted(runs) == sorted(s.run_id for s in starts)
    first = next(r for r in runs.values() if r.payload["input"]["order"] == "A-1")
    assert first.payload["input"] == {
        "order": "A-1",
        "amount": 12.5,
        "customer": "cust-A-1",
        "source": "shop",
        "via": "v1",
    }
    assert first.tenant == "acme" and first.payload["workflow_version"] == 1


async def test_messages_that_cannot_be_mapped_become_dead_letters_and_later_ones_still_start_runs(
    engine: Engine,
) -> None:
    kafka = engine.settings.kafka
    topic = await user_topic(kafka)
    await deploy(engine, orders("acme.picky", topic))

    end = await publish(
        kafka,
        topic,
        [
            (b"garbage", b"\x00\xffnot json"),
            (b"no-id", orjson.dumps({"amount": 50.0})),
            (b"bad-type", orjson.dumps({"id": 7, "amount": 50.0})),
            (b"odd-amount", orjson.dumps({"id": "X", "amount": "lots"})),
            order("B-1", 11.0),
        ],
    )
    await wait_committed(kafka, engine.triggers.group, topic, end)

    letters = {letter["key"]: letter for letter in await dead_letters(kafka, 4) if letter["topic"] == topic}
    where = f"trigger on {topic!r} of workflow 'acme.picky'"
    assert letters["garbage"]["reason"].startswith(f"{where}: filter: ")
    assert "the message value is not JSON" in letters["garbage"]["reason"]
    assert letters["garbage"]["value_base64"] is not None and letters["garbage"]["offset"] == 0
    assert letters["no-id"]["reason"].startswith(f"{where}: input.order: ")
    assert "run input does not match the input schema" in letters["bad-type"]["reason"]
    assert "input.order: 7 is not of type 'string'" in letters["bad-type"]["reason"]
    assert letters["odd-amount"]["reason"].startswith(f"{where}: filter: ")
    starts = await triggered_starts(kafka, "acme.picky")
    assert [s.payload["input"]["order"] for s in starts] == ["B-1"]
    await started_runs(kafka, "acme.picky", 1)


async def test_a_new_version_takes_over_the_trigger(engine: Engine) -> None:
    kafka = engine.settings.kafka
    topic = await user_topic(kafka)
    await deploy(engine, orders("acme.evolving", topic))
    end = await publish(kafka, topic, [order("C-1", 20.0)])
    await wait_committed(kafka, engine.triggers.group, topic, end)

    await deploy(engine, orders("acme.evolving", topic, version=2, via="v2"))
    await until(lambda: engine.triggers.deployed.by_topic[topic][0].definition.version == 2)
    end = await publish(kafka, topic, [order("C-2", 20.0)])
    await wait_committed(kafka, engine.triggers.group, topic, end)

    runs = await started_runs(kafka, "acme.evolving", 2)
    by_order = {r.payload["input"]["order"]: r.payload for r in runs.values()}
    assert (by_order["C-1"]["workflow_version"], by_order["C-1"]["input"]["via"]) == (1, "v1")
    assert (by_order["C-2"]["workflow_version"], by_order["C-2"]["input"]["via"]) == (2, "v2")


async def test_a_trigger_ignores_what_its_topic_held_before_it_was_deployed(engine: Engine) -> None:
    kafka = engine.settings.kafka
    topic = await user_topic(kafka)
    await publish(kafka, topic, [order("old", 99.0)])
    await deploy(engine, orders("acme.late", topic))

    end = await publish(kafka, topic, [order("new", 99.0)])
    await wait_committed(kafka, engine.triggers.group, topic, end)

    assert [s.payload["input"]["order"] for s in await triggered_starts(kafka, "acme.late")] == ["new"]


async def test_a_thousand_messages_start_exactly_their_runs_across_a_restart_and_a_redelivery(
    engine_factory: EngineFactory, bootstrap: str, tmp_path: Path
) -> None:
    """800 matching, 150 filtered out, 50 undecodable; the engine stops mid-way and another takes
    over; then the group's offsets are reset and every message comes again."""
    kafka = kafka_for(bootstrap)
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    topic = await user_topic(kafka)
    messages, matching = mixed_orders(1000, every=20, junk=7, filtered=(3, 11, 15), prefix="D-")

    async with engine_factory(store_url=store_url, kafka=kafka, trigger_batch=50) as first:
        await deploy(first, orders("acme.bulk", topic))
        group = first.triggers.group
        end = await publish(kafka, topic, messages)
        await wait_committed(kafka, group, topic, 200)
    async with engine_factory(store_url=store_url, kafka=kafka, trigger_batch=50) as second:
        await wait_committed(kafka, group, topic, end)
    await reset_offsets(kafka, group, topic)
    async with engine_factory(store_url=store_url, kafka=kafka) as third:
        await wait_committed(kafka, group, topic, end)
        runs = await started_runs(third.settings.kafka, "acme.bulk", 800)

    starts = await triggered_starts(kafka, "acme.bulk")
    assert len(starts) >= 1600  # every matching message at least twice (the redelivery)
    assert len({s.run_id for s in starts}) == 800
    assert set(runs) == {s.run_id for s in starts}
    assert sorted(r.payload["input"]["order"] for r in runs.values()) == sorted(matching)
    letters = [letter for letter in await dead_letters(kafka, 100) if letter["topic"] == topic]
    assert len(letters) >= 100 and {letter["offset"] for letter in letters} == set(range(7, 1000, 20))
    assert second.settings.group == first.settings.group == third.settings.group


async def test_deploying_a_new_version_while_messages_flow_loses_and_doubles_nothing(engine: Engine) -> None:
    """Messages keep coming while version 2 is deployed: each starts exactly one run, of the
    version in force when its turn came, and the versions follow the topic's order."""
    kafka = engine.settings.kafka
    topic = await user_topic(kafka)
    await deploy(engine, orders("acme.flowing", topic))
    count = 300
    messages = [order(f"F-{n:03}", 20.0) for n in range(count)]
    await wait_committed(kafka, engine.triggers.group, topic, await publish(kafka, topic, messages[:100]))

    async def flow() -> int:
        end = 0
        for at in range(100, count, 10):
            end = await publish(kafka, topic, messages[at : at + 10])
            await asyncio.sleep(0.2)
        return end

    flowing = asyncio.create_task(flow())
    await asyncio.sleep(0.5)
    await deploy(engine, orders("acme.flowing", topic, version=2, via="v2"))
    end = await flowing
    await wait_committed(kafka, engine.triggers.group, topic, end)

    runs = await started_runs(kafka, "acme.flowing", count)
    starts = await triggered_starts(kafka, "acme.flowing")
    assert len(runs) == count == len({s.run_id for s in starts})
    by_order = sorted(runs.values(), key=lambda r: r.payload["input"]["order"])
    versions = [r.payload["workflow_version"] for r in by_order]
    assert versions == sorted(versions) and versions[:100] == [1] * 100 and versions[-1] == 2, versions
    assert {r.payload["input"]["via"] for r in by_order if r.payload["workflow_version"] == 2} == {"v2"}
