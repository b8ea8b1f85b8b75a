"""A real `citadel up` with JSON logs and spans exported to a file: every stderr line is a JSON log
line naming its run and trace, a secret used by a failing http node appears in no log line, event
or GraphQL answer, and a run's trace holds one span per node attempt under the run's span."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import pytest
from aiohttp import web

from aggregates.store import RunStore
from citadel.gateway import RunningGateway, token_keys
from citadel.settings import Settings
from gateway.backend import Backend
from streams.engine import Engine
from streams.history import run_history
from streams.tracing import run_span_id, run_trace_id
from tests.conftest import EXAMPLES
from tests.e2e.processes import stop
from tests.gateway.conftest import Gateway
from tests.streams.test_tracing import FLAKY_CHAIN

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("CITADEL_KAFKA")), reason="starts `citadel up` with its embedded broker"
)
SECRET = "s3cr3t-obs-token-never-logged"
DEPLOY = "mutation($d: JSON!) { deployWorkflow(definition: $d) { version problems { message } } }"
START = "mutation($w: String!) { startRun(workflow: $w) { runId } }"
WATCH = "subscription($id: String!) { runEvents(runId: $id) { type } }"
RUN = """query($id: String!) {
  run(id: $id) {
    status error nodes { id status error errorClass output }
    attempts { nodeId message errorClass } history { type payload }
  }
}"""


@dataclass
class Up:
    home: Path
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    spans: Path
    url: str

    def log_lines(self) -> list[str]:
        return self.stderr.read_text().splitlines()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    home = tmp_path_factory.mktemp("observed")
    port = _free_port()
    env = {
        **os.environ,
        "CITADEL_HOME": str(home),
        "CITADEL_GATEWAY_PORT": str(port),
        "CITADEL_PARTITIONS": "2",
        "CITADEL_EXECUTOR_CONCURRENCY": "4",
        "CITADEL_LOG_FORMAT": "json",
        "CITADEL_LOG_LEVEL": "INFO",
        "CITADEL_TRACES": f"file:{home / 'spans.jsonl'}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export spans soon after they end, not every 5 s
        "CITADEL_SECRET_acme.API_TOKEN": SECRET,  # tenant acme's API_TOKEN
    }
    for name in ("CITADEL_EVENT_STORE", "CITADEL_CLICKHOUSE", "CITADEL_JWT_SECRET"):
        env.pop(name, None)
    stdout, stderr = home.parent / f"{home.name}.out", home.parent / f"{home.name}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "citadel.cli", "up"], env=env, stdout=out, stderr=err
        )
    running = Up(home, process, stdout, stderr, home / "spans.jsonl", f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 90
        # engine.json is written once the gateway serves.
        while not (home / "engine.json").exists():
            assert process.poll() is None, f"citadel up exited: {stderr.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "citadel up did not come up within 90 s"
            time.sleep(0.1)
        yield running
    finally:
        stop(process, signal.SIGINT)


@pytest.fixture(scope="module")
async def client(up: Up) -> AsyncIterator[Gateway]:
    """The gateway of `citadel up`, spoken to with tokens signed by its development secret."""
    keys = token_keys(Settings.from_env({"CITADEL_HOME": str(up.home)}))
    running = RunningGateway(up.url, cast(Backend, None), keys, None)
    async with httpx.AsyncClient(base_url=up.url, timeout=30) as http:
        yield Gateway(running, cast(Engine, None), http)


async def run_to_end(client: Gateway, definition: dict[str, Any], answers: list[Any]) -> str:
    """Deploy, start and watch a run to its end; every GraphQL answer is kept in `answers`."""
    answers.append(await client.graphql(DEPLOY, {"d": definition}))
    started = await client.graphql(START, {"w": definition["name"]})
    answers.append(started)
    run_id: str = started["data"]["startRun"]["runId"]
    answers.extend([event async for event in client.subscribe(WATCH, {"id": run_id})])
    return run_id


@contextlib.asynccontextmanager
async def failing_server() -> AsyncIterator[str]:
    """A server on loopback that answers 500, echoing the credential it was sent."""

    async def handle(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": "down", "you sent": request.headers.get("Authorization")}, status=500
        )

    app = web.Application()
    app.router.add_post("/charge", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/charge"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def test_a_secret_of_a_failing_http_node_is_in_no_log_line_event_or_graphql_answer(
    up: Up, client: Gateway
) -> None:
    answers: list[Any] = []
    async with failing_server() as url:
        definition = {
            "name": "charge",
            "nodes": [
                {
                    "id": "charge",
                    "type": "http",
                    "config": {
                        "method": "POST",
                        "url": url,
                        "headers": {
                            "Authorization": "Bearer {{secret:API_TOKEN}}",
                            "X-Key": "{{secret:API_TOKEN}}",
                        },
                        "secrets": ["API_TOKEN"],
                        "retry": {"max_attempts": 2, "delay_seconds": 0, "jitter": 0},
                    },
                }
            ],
        }
        run_id = await run_to_end(client, definition, answers)
    answer = await client.graphql(RUN, {"id": run_id})
    answers.append(answer)
    assert answer["data"]["run"]["status"] == "failed"
    node = answer["data"]["run"]["nodes"][0]
    assert node["errorClass"] == "HTTPStatus" and "500" in node["error"] and "***" in node["error"]
    answers.append(await client.graphql("{ run(id: 1) { status } }"))  # an error answer, for good measure
    for answered in answers:
        text = orjson.dumps(answered).decode()
        assert SECRET not in text and "Traceback" not in text, text

    store = RunStore(f"sqlite:///{up.home / 'events.db'}")
    try:
        events = run_history(store, run_id)
    finally:
        store.close()
    assert events and all(SECRET not in event.model_dump_json() for event in events)

    lines = up.log_lines()
    assert all(SECRET not in line for line in lines)
    records = [orjson.loads(line) for line in lines]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    ours = [r for r in records if r.get("run_id") == run_id]
    assert any(r["message"].startswith("attempt 1 failed: HTTPStatus") for r in ours), ours
    assert all(r["trace_id"] == f"{run_trace_id(run_id):032x}" and r["node_id"] == "charge" for r in ours)
    # The development token the gateway's access log would show is not in the log either.
    assert not any("eyJ" in line for line in lines)


def spans_of(up: Up, run_ids: set[str], attempts: int) -> list[dict[str, Any]]:
    """The exported spans of these runs, once `attempts` of them are in the file (the batch
    processor writes them shortly after they end)."""
    deadline = time.monotonic() + 30
    while True:
        text = up.spans.read_text() if up.spans.exists() else ""
        spans = [orjson.loads(line) for line in text.splitlines()]
        ours = [s for s in spans if s["attributes"].get("citadel.run_id") in run_ids]
        if len(ours) >= attempts or time.monotonic() > deadline:
            return ours
        time.sleep(0.1)


async def test_each_run_is_one_trace_with_a_span_per_node_attempt_under_the_runs_span(
    up: Up, client: Gateway
) -> None:
    answers: list[Any] = []
    run_ids = [await run_to_end(client, FLAKY_CHAIN, answers) for _ in range(2)]
    # Per run: its root span, then `first` once, `flaky` twice (a retry); the transform is decided
    # inline, with no attempt.
    spans = spans_of(up, set(run_ids), attempts=8)
    assert len(spans) == 8
    for run_id in run_ids:
        (root,) = [s for s in spans if s["attributes"]["citadel.run_id"] == run_id and s["parent_id"] is None]
        assert (
            root["name"].startswith("run ")
            and root["name"].endswith("traced")
            and root["attributes"]["citadel.status"] == "completed"
        )
        assert root["context"]["span_id"] == f"0x{run_span_id(run_id):016x}"
        trace = [s for s in spans if s["attributes"]["citadel.run_id"] == run_id and s is not root]
        assert {s["context"]["trace_id"] for s in [root, *trace]} == {f"0x{run_trace_id(run_id):032x}"}
        assert all(s["parent_id"] == f"0x{run_span_id(run_id):016x}" for s in trace)
        # Attempts begin within the run (their spans end after their results are delivered, which
        # the run's last decision may precede by a moment).
        assert all(root["start_time"] <= s["start_time"] <= root["end_time"] for s in trace), (root, trace)
        attempts = sorted((s["name"], s["attributes"]["citadel.attempt"]) for s in trace)
        assert attempts == [("node first", 1), ("node flaky", 1), ("node flaky", 2)]
        assert len({s["attributes"]["citadel.attempt_id"] for s in trace}) == 3
        statuses = {(s["name"], s["attributes"]["citadel.attempt"]): s["status"] for s in trace}
        assert statuses[("node flaky", 1)] == {"status_code": "ERROR", "description": "ValueError"}
        assert statuses[("node flaky", 2)]["status_code"] == "UNSET"


def test_the_banner_on_stdout_links_the_dashboard_with_the_development_token(up: Up) -> None:
    banner = up.stdout.read_text()
    link = re.search(rf"dashboard: +({re.escape(up.url)}/\?token=(\S+))", banner)
    assert link is not None, banner
    assert f"Authorization: Bearer {link[2]}" in banner
    assert link[2] not in up.stderr.read_text()


async def test_citadel_run_beside_citadel_up_links_the_run_on_the_dashboard(up: Up, client: Gateway) -> None:
    env = {**os.environ, "CITADEL_HOME": str(up.home), "CITADEL_LOG_FORMAT": "text"}
    for name in ("CITADEL_EVENT_STORE", "CITADEL_CLICKHOUSE"):
        env.pop(name, None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "citadel.cli", "run", str(EXAMPLES / "linear.yaml"), "--input", '{"n": 2}',
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    link = re.search(rf"watch it live: {re.escape(up.url)}/#run=([0-9a-f-]{{36}})", err.decode())
    assert link is not None, err.decode()
    query = "query($r: String!) { run(id: $r) { status } }"
    # `citadel run` starts runs of the tenant `default`.
    answer = await client.graphql(query, {"r": link[1]}, token=client.token("default"))
    assert answer["data"]["run"]["status"] == "completed", answer
