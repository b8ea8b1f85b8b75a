"""Health, readiness and metrics; clean refusals of bad tokens and oversized requests; schema fuzzing."""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

import graphql
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_graphql import mutations, nodes, queries

from gateway.schema import build_schema
from tests.gateway.conftest import Gateway

SCHEMA = str(build_schema())
# JSON arguments (definitions, inputs, payloads) and times, as a client could send them.
SCALARS = {
    "JSON": st.one_of(
        st.integers(-5, 5).map(nodes.Int),
        st.text(max_size=8).map(nodes.String),
        st.just(graphql.parse_value('{name: "x", nodes: [{id: "a", type: "transform"}]}')),
        st.just(graphql.parse_value("{n: 1}")),
    ),
    "DateTime": st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "yesterday"]).map(
        nodes.String
    ),
}


async def test_health_ready_and_metrics_answer(gateway: Gateway) -> None:
    assert (await gateway.http.get("/health")).json() == {"status": "ok"}
    ready = (await gateway.http.get("/ready")).json()
    assert ready == {"status": "ready", "checks": {"broker": "ok", "event_store": "ok", "clickhouse": "ok"}}
    metrics = (await gateway.http.get("/metrics")).text
    for name in (
        "citadel_runs_total",
        "citadel_node_attempt_seconds",
        "citadel_node_attempts_in_flight",
        "citadel_executor_capacity",
        "citadel_gateway_subscriptions",
        "citadel_projector_lag_seconds",
    ):
        assert name in metrics


def refusal(body: dict[str, Any]) -> str:
    [error] = body["errors"]
    assert set(error) == {"message", "extensions"}
    code: str = error["extensions"]["code"]
    return code


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer not-a-jwt",
        "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
        "Bearer " + "A" * 5000,
    ],
)
async def test_missing_and_malformed_tokens_get_a_clean_401(
    gateway: Gateway, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = await gateway.http.post("/graphql", json={"query": "{ me { tenant } }"}, headers=headers)
    assert response.status_code == 401
    assert refusal(response.json()) == "UNAUTHENTICATED"
    assert "Traceback" not in response.text


async def test_expired_forged_and_foreign_tokens_are_refused(gateway: Gateway) -> None:
    expired = gateway.token(lifetime=dt.timedelta(minutes=-5))
    forged = jwt.encode(
        {
            "sub": "x",
            "tenant": "acme",
            "roles": ["admin"],
            "iss": "citadel",
            "aud": "citadel-gateway",
            "exp": 9e9,
        },
        "not-the-secret-but-long-enough-for-hs256",
        algorithm="HS256",
    )
    claims = jwt.decode(gateway.token(), options={"verify_signature": False})
    foreign = jwt.encode(
        {**claims, "aud": "someone-else"}, gateway.running.keys.secret or "", algorithm="HS256"
    )
    dotted = jwt.encode(
        {**claims, "tenant": "acme.evil"}, gateway.running.keys.secret or "", algorithm="HS256"
    )
    for token, says in ((expired, "expired"), (forged, "invalid"), (foreign, "audience"), (dotted, "tenant")):
        response = await gateway.http.post(
            "/graphql", json={"query": "{ me { tenant } }"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 401 and says in response.json()["errors"][0]["message"]


async def test_subscriptions_without_a_valid_token_are_closed_as_forbidden(gateway: Gateway) -> None:
    import websockets

    url = gateway.running.url.replace("http://", "ws://") + "/graphql"
    async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": "Bearer nope"}}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403


async def test_oversized_and_overdeep_requests_get_clean_errors(gateway: Gateway) -> None:
    headers = {"Authorization": f"Bearer {gateway.token()}"}
    huge = {"query": "{ me { tenant } }", "variables": {"x": "y" * 400_000}}
    response = await gateway.http.post("/graphql", json=huge, headers=headers)
    assert response.status_code == 413 and refusal(response.json()) == "TOO_LARGE"
    nested = "{ " + "workflows { " * 12 + "name" + " }" * 13
    for document in (
        nested,
        "{ " + " ".join(f"a{i}: me {{ tenant }}" for i in range(30)) + " }",
    ):
        body = await gateway.graphql(document)
        assert body.get("errors") and all("Traceback" not in e["message"] for e in body["errors"])


async def test_times_without_a_zone_are_refused_naming_the_argument(gateway: Gateway) -> None:
    # Found by the schema fuzzer: a zoneless `since` reached ClickHouse and failed there.
    for document, name in (
        ('{ runs(since: "2026-01-01T00:00:00") { edges { cursor } } }', "since"),
        ('{ metrics(until: "2026-01-01T00:00:00") { since } }', "until"),
    ):
        (error,) = (await gateway.graphql(document))["errors"]
        assert error["extensions"]["code"] == "BAD_REQUEST" and f"`{name}`" in error["message"], error


async def test_a_rate_limit_per_token_refuses_with_429(gateway: Gateway) -> None:
    from gateway.auth import RateLimit

    limit = RateLimit(rate=0.001, burst=2)
    limit.take("t")
    limit.take("t")
    with pytest.raises(Exception, match="rate limit"):
        limit.take("t")
    limit.take("another token")


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
async def test_no_query_or_mutation_the_schema_allows_gets_a_server_error(
    gateway: Gateway, data: st.DataObject
) -> None:
    document = data.draw(queries(SCHEMA, custom_scalars=SCALARS) | mutations(SCHEMA, custom_scalars=SCALARS))
    response = await gateway.http.post(
        "/graphql",
        json={"query": document},
        headers={"Authorization": f"Bearer {gateway.token('fuzz', ('editor',))}"},
    )
    assert response.status_code < 500, (document, response.text)
    body = response.json()
    for error in body.get("errors") or []:
        assert error.get("extensions", {}).get("code") != "INTERNAL", (document, body)
        assert error["message"] != "internal error", (document, body)


async def test_a_callers_mistakes_are_not_logged_as_errors_and_a_fault_of_ours_is(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    headers = {"Authorization": f"Bearer {gateway.token('alice', ('viewer',))}"}
    mistakes = [
        "{ nosuchfield }",  # does not validate
        '{ run(id: "00000000-0000-0000-0000-000000000000") { id } }',  # not found
        'mutation { cancelRun(runId: "x", reason: "r") { runId } }',  # not allowed to a viewer
    ]
    with caplog.at_level(logging.INFO):
        for document in mistakes:
            body = (await gateway.http.post("/graphql", json={"query": document}, headers=headers)).json()
            assert body["errors"], body
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert sum("refused a GraphQL request" in r.getMessage() for r in caplog.records) == len(mistakes)

    # An exception of the gateway's own (a bug) is logged at ERROR, with its traceback.
    caplog.clear()
    try:
        raise RuntimeError("a bug")
    except RuntimeError as bug:
        fault = graphql.GraphQLError("a bug", original_error=bug)
    build_schema().process_errors([fault])
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is not None and "a bug" in caplog.text
