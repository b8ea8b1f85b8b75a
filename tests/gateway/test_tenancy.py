"""A tenant's names on the shared engine: workflows, subworkflows and user topics get its prefix."""

from __future__ import annotations

from gateway.tenancy import public_definition, scoped_definition
from schemas.definition import parse_definition

DEFINITION = {
    "name": "orders",
    "triggers": [{"topic": "orders", "input": {"id": "message.value.id"}}],
    "input": {"type": "object", "properties": {"id": {"type": "string"}}},
    "nodes": [
        {"id": "child", "type": "subworkflow", "config": {"workflow": "ship", "inputs": {"id": "input.id"}}},
        {"id": "tell", "type": "kafka", "needs": ["child"], "config": {"topic": "shipped", "value": "input"}},
    ],
}


def test_a_tenants_workflows_and_topics_are_deployed_under_its_prefix_and_shown_without() -> None:
    deployed = scoped_definition("acme", DEFINITION)
    assert deployed["name"] == "acme.orders"
    assert deployed["triggers"][0]["topic"] == "acme.orders"
    assert [n["config"].get("workflow", n["config"].get("topic")) for n in deployed["nodes"]] == [
        "acme.ship",
        "acme.shipped",
    ]
    parse_definition(deployed)  # still a valid definition
    assert public_definition("acme", deployed) == DEFINITION
    assert DEFINITION["name"] == "orders", "the caller's document is left as it was"
