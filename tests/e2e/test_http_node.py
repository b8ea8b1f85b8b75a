"""The http node end to end: a real local server, a secret from the environment, and the secret
nowhere in the run's events."""

from __future__ import annotations

import pytest
from aiohttp import web

from schemas.definition import parse_definition
from streams.engine import Engine
from tests.e2e.test_examples import run_to_end

SECRET = "s3cr3t-token-do-not-leak"


async def test_an_http_node_calls_a_server_with_a_secret_that_no_event_contains(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CITADEL_SECRET_API_TOKEN", SECRET)
    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        body = await request.json()
        # A careless server that echoes the credential back.
        return web.json_response({"total": sum(body["items"]), "auth": request.headers["Authorization"]})

    app = web.Application()
    app.router.add_post("/sum", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        definition = parse_definition(
            {
                "name": "call-api",
                "nodes": [
                    {
                        "id": "call",
                        "type": "http",
                        "config": {
                            "method": "POST",
                            "url": f"http://127.0.0.1:{port}/sum",
                            "headers": {"Authorization": "Bearer {{secret:API_TOKEN}}"},
                            "secrets": ["API_TOKEN"],
                            "inputs": {"json": "{'items': input.items}"},
                        },
                    }
                ],
                "outputs": {"total": "call.body.total"},
            }
        ).model_dump(mode="json")
        report = await run_to_end(engine, definition, {"items": [1, 2, 3]})
    finally:
        await runner.cleanup()
    assert report.status == "completed", report.error
    assert report.outputs == {"total": 6}
    assert seen[0]["Authorization"] == f"Bearer {SECRET}"
    assert seen[0]["Idempotency-Key"]
    succeeded = next(e for e in report.events if e.type == "NodeSucceeded")
    assert succeeded.payload["output"]["body"]["auth"] == "Bearer ***"  # the echo was redacted
    for event in report.events:
        assert SECRET not in event.model_dump_json(), f"{event.type} carries the secret"
