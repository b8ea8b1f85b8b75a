"""Incoming webhooks: a signed POST starts a run of the latest version at once; a missing, wrong or
stale signature gets 401, and so does a workflow without a webhook, which the caller cannot tell
apart; a retried delivery gets the same run; bad input gets 422 naming the field; an oversized
body gets 413; the secret shows in no answer."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from schemas.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from tests.gateway.conftest import Gateway

DEPLOY = """mutation($d: JSON!) {
  deployWorkflow(definition: $d) { workflow version problems { location message } } }"""
RUN = """query($r: String!) { run(id: $r) { status workflow input outputs } }"""
ORDERS = {
    "name": "orders",
    "input": {
        "type": "object",
        "properties": {"order": {"type": "integer"}, "source": {"type": "string"}},
        "required": ["order"],
    },
    "nodes": [{"id": "total", "type": "transform", "config": {"output": "input.order * 10"}}],
    "outputs": {"total": "total"},
    "webhook": {"secret": "ORDERS_HOOK", "inputs": {"order": "body.id", "source": "headers['x-source']"}},
}
PLAIN = {
    "name": "plain",
    "input": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
    "nodes": [{"id": "echo", "type": "transform", "config": {"output": "input.n"}}],
    "outputs": {"n": "echo"},
    "webhook": {"secret": "ORDERS_HOOK"},
}

NO_HOOK = {key: value for key, value in PLAIN.items() if key != "webhook"} | {"name": "quiet"}
UNSET_SECRET = PLAIN | {"name": "unset", "webhook": {"secret": "UNSET_HOOK"}}


@pytest.fixture(scope="module")
def secret() -> Iterator[str]:
    value = secrets.token_hex(20)
    # A tenant's secret NAME is the engine's secret TENANT.NAME (gateway/tenancy.py).
    names = [f"CITADEL_SECRET_{tenant}.ORDERS_HOOK" for tenant in ("acme", "default")]
    for name in names:
        os.environ[name] = value
    yield value
    for name in names:
        del os.environ[name]


@pytest.fixture(scope="module")
async def deployed(gateway: Gateway, secret: str) -> Gateway:
    for definition in (ORDERS, PLAIN):
        result = (await gateway.data(DEPLOY, {"d": definition}))["deployWorkflow"]
        assert result["problems"] == [], result
    return gateway


def signed(secret: str, body: bytes, at: float | None = None, **extra: str) -> dict[str, str]:
    timestamp = int(time.time() if at is None else at)
    return {
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        "Content-Type": "application/json",
        **extra,
    }


async def post(gateway: Gateway, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    response = await gateway.http.post(path, content=body, headers=headers)
    return response.status_code, response.json()


async def finished_run(gateway: Gateway, run_id: str, tenant: str = "acme") -> dict[str, Any]:
    """The run once it has ended (the hook answers before the run exists)."""
    async with asyncio.timeout(60):
        while True:
            body = await gateway.graphql(RUN, {"r": run_id}, token=gateway.token(tenant))
            run = (body.get("data") or {}).get("run")
            if run is not None and run["status"] != "running":
                return dict(run)
            await asyncio.sleep(0.1)


async def test_a_signed_delivery_starts_a_run_from_the_mapped_body_at_once(
    deployed: Gateway, secret: str
) -> None:
    body = orjson.dumps({"id": 7, "customer": "ada"})
    status, answer = await post(
        deployed, "/hooks/acme/orders", body, signed(secret, body, **{"X-Source": "shop"})
    )
    assert status == 202, answer
    assert answer["workflow"] == "orders" and answer["version"] == 1
    run = await finished_run(deployed, answer["run_id"])
    assert run["status"] == "completed"
    assert run["input"] == {"order": 7, "source": "shop"}
    assert run["outputs"] == {"total": 70}


async def test_without_mapping_the_body_is_the_input(deployed: Gateway, secret: str) -> None:
    body = orjson.dumps({"n": 5})
    status, answer = await post(deployed, "/hooks/acme/plain", body, signed(secret, body))
    assert status == 202, answer
    assert (await finished_run(deployed, answer["run_id"]))["outputs"] == {"n": 5}


async def test_a_retried_delivery_gets_the_same_run(deployed: Gateway, secret: str) -> None:
    body = orjson.dumps({"n": 1})
    headers = signed(secret, body)
    first = await post(deployed, "/hooks/acme/plain", body, headers)
    replayed = await post(deployed, "/hooks/acme/plain", body, headers)
    assert first[0] == replayed[0] == 202
    assert first[1]["run_id"] == replayed[1]["run_id"]
    # Signed anew (another timestamp) but with the same Idempotency-Key: still the same run.
    keyed = [
        await post(
            deployed,
            "/hooks/acme/plain",
            body,
            signed(secret, body, at=time.time() - i, **{"Idempotency-Key": "order-9"}),
        )
        for i in (0, 5)
    ]
    assert keyed[0][1]["run_id"] == keyed[1][1]["run_id"] != first[1]["run_id"]


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        (lambda secret, body: {}, "X-Citadel-Timestamp header is missing"),
        (
            lambda secret, body: {TIMESTAMP_HEADER: str(int(time.time()))},
            "X-Citadel-Signature header is missing",
        ),
        (lambda secret, body: signed("not-the-secret", body), "does not match"),
        (lambda secret, body: signed(secret, body + b" "), "does not match"),
        (lambda secret, body: signed(secret, body, at=time.time() - 301), "beyond the tolerance of 300 s"),
        (lambda secret, body: signed(secret, body, at=time.time() + 301), "beyond the tolerance of 300 s"),
        (
            lambda secret, body: {**signed(secret, body), TIMESTAMP_HEADER: "yesterday"},
            "must be unix seconds",
        ),
    ],
    ids=[
        "no timestamp",
        "no signature",
        "wrong secret",
        "body changed",
        "stale",
        "from the future",
        "not a time",
    ],
)
async def test_a_delivery_that_does_not_verify_is_refused_with_401(
    deployed: Gateway, secret: str, headers: Any, words: str
) -> None:
    body = orjson.dumps({"n": 2})
    status, answer = await post(deployed, "/hooks/acme/plain", body, headers(secret, body))
    assert status == 401
    (error,) = answer["errors"]
    assert words in error["message"] and error["extensions"]["code"] == "UNAUTHENTICATED"
    assert secret not in str(answer)


async def test_input_that_fails_the_input_schema_gets_422_naming_the_field(
    deployed: Gateway, secret: str
) -> None:
    body = orjson.dumps({"n": "five"})
    status, answer = await post(deployed, "/hooks/acme/plain", body, signed(secret, body))
    assert status == 422
    (error,) = answer["errors"]
    assert "input.n" in error["message"]
    assert error["extensions"]["problems"] == [
        {"location": "input.n", "message": "'five' is not of type 'integer'"}
    ]
    body = b"[1, 2]"
    status, answer = await post(deployed, "/hooks/acme/plain", body, signed(secret, body))
    assert status == 422 and "must be a JSON object" in answer["errors"][0]["message"]


async def test_an_oversized_body_gets_413_before_it_is_read(deployed: Gateway, secret: str) -> None:
    body = orjson.dumps({"n": 1, "padding": "x" * (256 * 1024)})
    status, answer = await post(deployed, "/hooks/acme/plain", body, signed(secret, body))
    assert status == 413
    assert answer["errors"][0]["extensions"]["code"] == "TOO_LARGE"


async def test_no_workflow_no_webhook_no_secret_and_a_wrong_signature_get_the_same_401(
    deployed: Gateway, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.hooks")
    for definition in (NO_HOOK, UNSET_SECRET):
        result = (await deployed.data(DEPLOY, {"d": definition}))["deployWorkflow"]
        assert result["problems"] == [], result
    body = orjson.dumps({"n": 1})
    wrong = signed("not the secret", body)
    refused = await post(deployed, "/hooks/acme/plain", body, wrong)
    assert refused[0] == 401
    paths = (
        "/hooks/acme/nothing",
        "/hooks/other/plain",
        "/hooks/plain",
        "/hooks/acme/quiet",
        "/hooks/acme/unset",
    )
    for path in paths:
        assert await post(deployed, path, body, signed(secret, body)) == refused, path
        assert await post(deployed, path, body, wrong) == refused, path
    for headers in ({}, {TIMESTAMP_HEADER: "yesterday", SIGNATURE_HEADER: "sha256=00"}):
        known = await post(deployed, "/hooks/acme/plain", body, headers)
        assert known[0] == 401 and await post(deployed, "/hooks/acme/nothing", body, headers) == known
    logged = caplog.text
    for reason in (
        "acme/nothing refused: no such workflow",
        "other/plain refused: no such workflow",
        "acme/quiet refused: the workflow has no webhook",
        "acme/unset refused: its secret 'acme.UNSET_HOOK' is not configured",
        "acme/plain refused: X-Citadel-Signature does not match",
    ):
        assert reason in logged
    assert secret not in logged


async def test_a_stale_timestamp_is_told_only_to_a_sender_whose_signature_verifies(
    deployed: Gateway, secret: str
) -> None:
    body = orjson.dumps({"n": 1})
    stale = time.time() - 301
    status, answer = await post(deployed, "/hooks/acme/plain", body, signed("not the secret", body, at=stale))
    assert status == 401 and "does not match" in answer["errors"][0]["message"]
    status, answer = await post(deployed, "/hooks/acme/plain", body, signed(secret, body, at=stale))
    assert status == 401 and "beyond the tolerance of 300 s" in answer["errors"][0]["message"]


async def test_the_default_tenant_is_the_path_without_a_tenant(deployed: Gateway, secret: str) -> None:
    token = deployed.token("default")
    result = (await deployed.data(DEPLOY, {"d": PLAIN}, token=token))["deployWorkflow"]
    assert result["problems"] == []
    body = orjson.dumps({"n": 3})
    status, answer = await post(deployed, "/hooks/plain", body, signed(secret, body))
    assert status == 202, answer
    run = await finished_run(deployed, answer["run_id"], tenant="default")
    assert (run["workflow"], run["outputs"]) == ("plain", {"n": 3})
