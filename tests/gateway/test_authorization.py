"""Who may do what: every operation for every role, and every operation against another tenant's ids."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.auth import ROLES, Principal
from tests.gateway.conftest import LINEAR, Gateway

GATED = {"name": "gated", "nodes": [{"id": "review", "type": "approval"}]}
DEPLOY = "mutation($d: JSON!) { deployWorkflow(definition: $d) { workflow problems { location } } }"
START = "mutation($w: String!, $i: JSON) { startRun(workflow: $w, input: $i) { runId } }"
WATCH = "subscription($r: String!) { runEvents(runId: $r) { version type } }"


@pytest.fixture(scope="module")
async def ids(gateway: Gateway) -> dict[str, str]:
    """Tenant acme's runs: one completed, one waiting for approval."""
    for definition in (LINEAR, GATED):
        await gateway.data(DEPLOY, {"d": definition})
    done = (await gateway.data(START, {"w": "linear", "i": {"n": 2}}))["startRun"]["runId"]
    waiting = (await gateway.data(START, {"w": "gated"}))["startRun"]["runId"]
    async for _ in gateway.subscribe(WATCH, {"r": done}):
        pass
    return {"done": done, "waiting": waiting}


# (operation, permission it needs, document, variables with {done}/{waiting} for acme's run ids)
OPERATIONS: list[tuple[str, str | None, str, dict[str, Any]]] = [
    ("me", None, "{ me { tenant } }", {}),
    ("workflows", "workflow:read", "{ workflows { name versions { version } } }", {}),
    ("workflow", "workflow:read", '{ workflow(name: "linear") { name definition } }', {}),
    ("runs", "run:read", "{ runs(first: 5) { edges { node { id } } } }", {}),
    ("run", "run:read", "query($r: String!) { run(id: $r) { id outputs nodes { id } } }", {"r": "{done}"}),
    ("runAt", "run:read", "query($r: String!) { runAt(id: $r, version: 1) { status } }", {"r": "{done}"}),
    ("history", "run:read", "query($r: String!) { run(id: $r) { history { type } } }", {"r": "{done}"}),
    ("audit", "analytics:read", "query($r: String!) { audit(runId: $r) }", {"r": "{done}"}),
    ("metrics", "analytics:read", "{ metrics { runsByStatus nodeDurations } }", {}),
    ("deployWorkflow", "workflow:deploy", DEPLOY, {"d": LINEAR}),
    ("startRun", "run:start", START, {"w": "linear", "i": {"n": 1}}),
    (
        "signal",
        "run:signal",
        'mutation($r: String!) { signal(runId: $r, nodeId: "review") { runId } }',
        {"r": "{waiting}"},
    ),
    (
        "retryNode",
        "run:retry",
        'mutation($r: String!) { retryNode(runId: $r, nodeId: "square") { runId } }',
        {"r": "{done}"},
    ),
    (
        "rerun",
        "run:rerun",
        'mutation($r: String!) { rerun(runId: $r, fromNode: "square") { runId } }',
        {"r": "{done}"},
    ),
    (
        "cancelRun",
        "run:cancel",
        "mutation($r: String!) { cancelRun(runId: $r) { runId } }",
        {"r": "{waiting}"},
    ),
    ("rebuildProjections", "projections:rebuild", "mutation { rebuildProjections }", {}),
]
SUBSCRIPTIONS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("runEvents", "run:read", WATCH, {"r": "{done}"}),
    ("allRunEvents", "run:read", "subscription { allRunEvents(fromPosition: 1) { runId version } }", {}),
]


def filled(variables: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
    return json.loads(
        json.dumps(variables).replace("{done}", ids["done"]).replace("{waiting}", ids["waiting"])
    )


def codes(body: dict[str, Any]) -> set[str]:
    return {e.get("extensions", {}).get("code", "GRAPHQL") for e in body.get("errors") or []}


def may(role: str, permission: str | None) -> bool:
    return permission is None or Principal("x", "acme", (role,), "x").may(permission)


@pytest.mark.parametrize("role", sorted(ROLES))
async def test_every_operation_is_allowed_exactly_when_the_role_grants_it(
    gateway: Gateway, ids: dict[str, str], role: str
) -> None:
    token = gateway.token("acme", (role,))
    for name, permission, document, variables in OPERATIONS:
        body = await gateway.graphql(document, filled(variables, ids), token)
        if may(role, permission):
            assert "FORBIDDEN" not in codes(body) and "INTERNAL" not in codes(body), (role, name, body)
        else:
            assert codes(body) == {"FORBIDDEN"}, (role, name, body)
            assert body["data"] is None, (role, name, body)


async def first_message(
    gateway: Gateway, token: str, document: str, variables: dict[str, Any]
) -> dict[str, Any]:
    async with gateway.socket(token) as ws:
        await ws.send(
            json.dumps(
                {"id": "1", "type": "subscribe", "payload": {"query": document, "variables": variables}}
            )
        )
        message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 30))
        return message


@pytest.mark.parametrize("role", sorted(ROLES))
async def test_every_subscription_is_allowed_exactly_when_the_role_grants_it(
    gateway: Gateway, ids: dict[str, str], role: str
) -> None:
    token = gateway.token("acme", (role,))
    for name, permission, document, variables in SUBSCRIPTIONS:
        message = await first_message(gateway, token, document, filled(variables, ids))
        if may(role, permission):
            assert message["type"] == "next" and not message["payload"].get("errors"), (role, name, message)
        else:
            assert message["type"] == "next", (role, name, message)
            assert codes(message["payload"]) == {"FORBIDDEN"}, (role, name, message)


async def test_another_tenants_ids_are_denied_exactly_like_ids_that_do_not_exist(
    gateway: Gateway, ids: dict[str, str]
) -> None:
    intruder = gateway.token("globex", ("admin",))
    missing = {
        "done": "00000000-0000-4000-8000-000000000000",
        "waiting": "00000000-0000-4000-8000-000000000001",
    }
    secret_bits = ("acme", '"result"', "36")
    for name, _, document, variables in [*OPERATIONS, *SUBSCRIPTIONS]:
        if "{done}" not in json.dumps(variables) and "{waiting}" not in json.dumps(variables):
            continue
        if name in ("runEvents",):
            theirs = (await first_message(gateway, intruder, document, filled(variables, ids)))["payload"]
            nothing = (await first_message(gateway, intruder, document, filled(variables, missing)))[
                "payload"
            ]
        else:
            theirs = await gateway.graphql(document, filled(variables, ids), intruder)
            nothing = await gateway.graphql(document, filled(variables, missing), intruder)
        assert codes(theirs) == {"NOT_FOUND"}, (name, theirs)
        assert theirs["data"] is None
        text = json.dumps(theirs)
        # A random run id may hold "36" itself: look for the secrets in what is not the id.
        answer = text.replace(ids["done"], "ID").replace(ids["waiting"], "ID")
        assert not any(bit in answer for bit in secret_bits), (name, text)
        # Word for word the answer for an id that exists nowhere, but for the id itself.
        assert text.replace(ids["done"], "ID").replace(ids["waiting"], "ID") == json.dumps(nothing).replace(
            missing["done"], "ID"
        ).replace(missing["waiting"], "ID"), name


async def test_another_tenant_sees_none_of_the_workflows_runs_or_events(
    gateway: Gateway, ids: dict[str, str]
) -> None:
    intruder = gateway.token("globex", ("admin",))
    seen = await gateway.data(
        '{ workflows { name } workflow(name: "linear") { name } runs { edges { node { id } } } '
        "metrics { runsByStatus } }",
        token=intruder,
    )
    assert seen == {"workflows": [], "workflow": None, "runs": {"edges": []}, "metrics": {"runsByStatus": []}}
    body = await gateway.graphql(START, {"w": "linear", "i": {"n": 1}}, intruder)
    assert codes(body) == {"NOT_FOUND"}
    # Its own run, deployed under the same name, is all its stream of every run shows.
    await gateway.data(DEPLOY, {"d": LINEAR}, intruder)
    own = (await gateway.data(START, {"w": "linear", "i": {"n": 4}}, intruder))["startRun"]["runId"]
    events = []
    async for payload in stream(gateway, intruder):
        events.append(payload)
        if payload["runId"] == own and payload["type"] == "Completed":
            break
    assert {e["runId"] for e in events} == {own}
    assert ids["done"] not in json.dumps(events)


async def stream(gateway: Gateway, token: str) -> AsyncIterator[dict[str, Any]]:
    document = "subscription { allRunEvents(fromPosition: 1) { runId version type } }"
    async for payload in gateway.subscribe(document, {}, token):
        yield payload["data"]["allRunEvents"]
