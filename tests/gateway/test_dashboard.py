"""The dashboard page: served with a strict content security policy, and every GraphQL document it
sends is valid against the real schema and answers for a real run, so the page cannot drift."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from graphql import OperationDefinitionNode, OperationType, parse, validate

from gateway.app import STATIC
from gateway.schema import build_schema
from tests.gateway.conftest import LINEAR, Gateway

SCRIPT = STATIC / "dashboard.js"


def page_documents(script: Path = SCRIPT) -> dict[str, str]:
    """The `DOCUMENTS` object between the page script's graphql-documents markers."""
    text = script.read_text()
    block = text[text.index("// graphql-documents:begin") : text.index("// graphql-documents:end")]
    return dict(re.findall(r"^  (\w+): `([^`]*)`,$", block, flags=re.MULTILINE))


DOCUMENTS = page_documents()


def operation(document: str) -> OperationType:
    definition = parse(document).definitions[0]
    assert isinstance(definition, OperationDefinitionNode)
    return definition.operation


async def test_the_page_is_served_at_the_root_and_at_dashboard_with_a_content_security_policy(
    gateway: Gateway,
) -> None:
    for path in ("/", "/dashboard"):
        response = await gateway.http.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self';" in policy
        assert "frame-ancestors 'none'" in policy
        assert f"ws://{gateway.http.base_url.netloc.decode()}" in policy
        assert response.headers["referrer-policy"] == "no-referrer"
        # No inline script or style: everything the page runs is a file of its own origin.
        assert not re.search(r"<script(?![^>]*\bsrc=)", response.text)
        assert "<style" not in response.text and " style=" not in response.text
        assert "http://" not in response.text.replace('"http://www.w3.org', "")
    script = await gateway.http.get("/static/dashboard.js")
    style = await gateway.http.get("/static/dashboard.css")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")


def test_every_document_of_the_page_is_valid_against_the_schema_and_used_by_it() -> None:
    schema = build_schema()._schema
    assert set(DOCUMENTS) == {"me", "runs", "run", "metrics", "allRunEvents", "runEvents"}
    for name, document in DOCUMENTS.items():
        assert validate(schema, parse(document)) == [], name
    script = SCRIPT.read_text()
    for name in DOCUMENTS:
        assert re.search(rf"""(request|subscribe)\("{name}"[,)]""", script), f"{name} is never sent"


@pytest.fixture(scope="module")
async def finished_run(gateway: Gateway) -> str:
    deployed = await gateway.data(
        "mutation($d: JSON!) { deployWorkflow(definition: $d) { version } }", {"d": LINEAR}
    )
    assert deployed["deployWorkflow"]["version"] >= 1
    started = await gateway.data(
        'mutation { startRun(workflow: "linear", input: {n: 4}) { runId } }', token=gateway.token()
    )
    run_id: str = started["startRun"]["runId"]
    watch = "subscription($id: String!) { runEvents(runId: $id) { type } }"
    async for _ in gateway.subscribe(watch, {"id": run_id}):
        pass  # until the run ends
    return run_id


async def test_the_page_queries_answer_for_a_real_run(gateway: Gateway, finished_run: str) -> None:
    me = await gateway.data(DOCUMENTS["me"])
    assert me["me"]["tenant"] == "acme"
    run = (await gateway.data(DOCUMENTS["run"], {"id": finished_run}))["run"]
    assert run["status"] == "completed" and run["outputs"] == {"result": 64}
    assert {n["id"]: n["status"] for n in run["nodes"]} == {"double": "succeeded", "square": "succeeded"}
    assert [a["nodeId"] for a in run["attempts"]] == ["double", "square"]
    runs = await gateway.data(DOCUMENTS["runs"], {"status": None, "first": 25, "after": None})
    assert set(runs["runs"]) == {"edges", "pageInfo"}
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).isoformat()
    metrics = (await gateway.data(DOCUMENTS["metrics"], {"since": since}))["metrics"]
    assert all(isinstance(metrics[field], list) for field in ("runsPerMinute", "nodeTypeFailureRates"))


async def test_the_page_subscriptions_stream_a_real_runs_events(gateway: Gateway, finished_run: str) -> None:
    assert operation(DOCUMENTS["runEvents"]) == OperationType.SUBSCRIPTION
    variables = {"runId": finished_run, "fromVersion": 1}
    events = [m["data"]["runEvents"] async for m in gateway.subscribe(DOCUMENTS["runEvents"], variables)]
    assert [e["version"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "Completed"
    first: dict[str, Any] | None = None
    stream = gateway.subscribe(DOCUMENTS["allRunEvents"], {"fromPosition": 0})
    async with contextlib.aclosing(stream):  # a live stream: it never completes on its own
        async for message in stream:
            first = message["data"]["allRunEvents"]
            break
    assert first is not None and {"runId", "version", "type", "time"} <= set(first)


async def test_a_browser_shows_the_run_its_nodes_and_the_charts(gateway: Gateway, finished_run: str) -> None:
    """The page in headless Chromium, linked to a run: what a person sees, as the DOM it built."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here (.ci/run installs it)")
    url = f"{gateway.running.url}/?token={gateway.token()}#run={finished_run}"
    process = await asyncio.create_subprocess_exec(
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
        "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    dom, _ = await asyncio.wait_for(process.communicate(), 120)
    page = dom.decode()
    # Signed in with the link's token, live, the run chosen from the link and shown with its nodes.
    assert "tester · acme · admin" in page
    assert f"linear v1 · {finished_run}" in page
    rows = re.findall(r'<span class="mono">(\w+)</span></td><td><span class="status \w+">(\w+)<', page)
    assert ("double", "succeeded") in rows and ("square", "succeeded") in rows
    assert '"result": 64' in page
    # The run list has it, and the charts drew bars (the run's minute, its node types).
    assert finished_run[:8] in page
    assert page.count('class="bar') >= 3
