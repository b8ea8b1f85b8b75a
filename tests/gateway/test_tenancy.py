"""A tenant's names on the shared engine: workflows, subworkflows, user topics and secrets get its prefix."""

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
        {
            "id": "call",
            "type": "http",
            "config": {
                "url": "https://api.example.com/orders",
                "secrets": ["API_TOKEN"],
                "headers": {"Authorization": "Bearer {{ secret:API_TOKEN }}"},
            },
            "compensate": {
                "type": "http",
                "config": {
                    "url": "https://api.example.com/undo",
                    "method": "POST",
                    "secrets": ["UNDO_KEY"],
                    "headers": {"X-Key": "{{secret:UNDO_KEY}}"},
                },
            },
        },
        {
            "id": "each",
            "type": "map",
            "config": {
                "items": "[1, 2]",
                "node": {
                    "type": "http",
                    "config": {"url": "https://api.example.com/item", "secrets": ["ITEM_KEY"]},
                },
            },
        },
    ],
    "webhook": {"secret": "HOOK_KEY"},
    "notify": [{"url": "https://ops.example.com/told", "secret": "NOTIFY_KEY"}],
}


def test_a_tenants_workflows_and_topics_are_deployed_under_its_prefix_and_shown_without() -> None:
    deployed = scoped_definition("acme", DEFINITION)
    assert deployed["name"] == "acme.orders"
    assert deployed["triggers"][0]["topic"] == "acme.orders"
    assert [n["config"].get("workflow", n["config"].get("topic")) for n in deployed["nodes"][:2]] == [
        "acme.ship",
        "acme.shipped",
    ]
    call, each = deployed["nodes"][2], deployed["nodes"][3]
    # The secrets it names are the tenant's: acme's API_TOKEN is the engine's acme.API_TOKEN.
    assert call["config"]["secrets"] == ["acme.API_TOKEN"]
    assert call["config"]["headers"] == {"Authorization": "Bearer {{ secret:acme.API_TOKEN }}"}
    assert call["compensate"]["config"]["headers"] == {"X-Key": "{{secret:acme.UNDO_KEY}}"}
    assert each["config"]["node"]["config"]["secrets"] == ["acme.ITEM_KEY"]
    assert deployed["webhook"]["secret"] == "acme.HOOK_KEY"
    assert deployed["notify"][0]["secret"] == "acme.NOTIFY_KEY"
    parsed = parse_definition(deployed)  # still a valid definition
    assert parsed.nodes[2].typed_config().secrets == ["acme.API_TOKEN"]
    assert public_definition("acme", deployed) == DEFINITION
    assert DEFINITION["name"] == "orders", "the caller's document is left as it was"
