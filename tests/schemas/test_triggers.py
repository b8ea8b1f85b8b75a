"""Specifications of Kafka triggers and the `kafka` node in definitions: what they accept, and
every problem named by field, with the rest of the definition's problems."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.definition import DefinitionInvalid, KafkaTrigger, parse_definition


def definition(triggers: list[Any], *nodes: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "orders",
        "input": {"type": "object", "required": ["order"]},
        "nodes": list(nodes) or [{"id": "a", "type": "transform", "config": {"output": "input.order"}}],
        "triggers": triggers,
    }


def problems(document: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(DefinitionInvalid) as caught:
        parse_definition(document)
    return {p.location: p.message for p in caught.value.problems}


def test_a_trigger_maps_a_message_to_the_input_by_field_or_as_a_whole() -> None:
    parsed = parse_definition(
        definition(
            [
                {
                    "topic": "orders",
                    "filter": "message.value.amount > 10 && message.headers['kind'] == 'order'",
                    "input": {"order": "message.value.id", "from": "message.key"},
                },
                {"topic": "orders.v2", "input": "message.value"},
            ]
        )
    )

    assert parsed.triggers == [
        KafkaTrigger(
            topic="orders",
            filter="message.value.amount > 10 && message.headers['kind'] == 'order'",
            input={"order": "message.value.id", "from": "message.key"},
        ),
        KafkaTrigger(topic="orders.v2", filter=None, input="message.value"),
    ]


def test_a_definition_without_triggers_has_none() -> None:
    document = definition([])
    del document["triggers"]

    assert parse_definition(document).triggers == []


def test_every_trigger_problem_is_named_by_field_with_the_nodes_problems() -> None:
    found = problems(
        definition(
            [
                {"topic": "citadel.commands"},
                {"topic": "bad topic!"},
                {"topic": "orders", "filter": "input.x > 1", "input": {"order": "message.value.("}},
                {"topic": "orders", "input": "order_total", "retries": 3},
                "orders",
            ],
            {"id": "a", "type": "teleport"},
        )
    )

    assert found["triggers[0].topic"].endswith("topics starting with 'citadel.' belong to the engine")
    assert "should match pattern" in found["triggers[1].topic"]
    assert found["triggers[2].filter"] == "references 'input'; a trigger sees only 'message'"
    assert found["triggers[2].input.order"].startswith("expression does not parse")
    assert found["triggers[3].retries"] == "unknown field"
    assert "valid dictionary" in found["triggers[4]"]
    assert found["nodes.a.type"].startswith("unknown node type 'teleport'")


def kafka_node(**config: Any) -> dict[str, Any]:
    return {"id": "publish", "type": "kafka", "config": config}


def test_a_kafka_node_takes_a_topic_name_and_expressions_for_key_headers_and_value() -> None:
    node = kafka_node(
        topic="orders.shipped",
        key="input.order",
        headers={"source": "'citadel'", "run": "run.id"},
        value="{'order': input.order}",
    )

    parsed = parse_definition(definition([], node))

    assert parsed.node("publish").typed_config().headers == {"source": "'citadel'", "run": "run.id"}


def test_a_kafka_node_may_not_publish_to_the_engine_topics_and_its_expressions_are_checked() -> None:
    found = problems(
        definition(
            [],
            kafka_node(topic="citadel.commands", value="input"),
            kafka_node(topic="out", key="ghost.id", headers={"h": "input.("}, value="input")
            | {"id": "second"},
            kafka_node(topic="out") | {"id": "third"},
        )
    )

    assert found["nodes.publish.config.topic"].endswith(
        "topics starting with 'citadel.' belong to the engine"
    )
    assert found["nodes.second.config.key"] == "references 'ghost', which is not 'input', 'run' or a node"
    assert found["nodes.second.config.headers.h"].startswith("expression does not parse")
    assert found["nodes.third.config.value"] == "required field is missing"
