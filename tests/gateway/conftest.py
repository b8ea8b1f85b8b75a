"""A real gateway for the gateway's tests: engine on the session's broker, SQLite, the projector
into the session's chDB, uvicorn on a free loopback port; clients speak HTTP and graphql-transport-ws."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import websockets

from citadel.gateway import RunningGateway, running_gateway
from citadel.projector import running_projector
from citadel.settings import Settings
from gateway.auth import issue_token
from projections.clickhouse import Connection
from streams.engine import Engine
from tests.conftest import EngineFactory

LINEAR = {
    "name": "linear",
    "input": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
    "nodes": [
        {"id": "double", "type": "transform", "config": {"output": {"value": "input.n * 2"}}},
        {
            "id": "square",
            "type": "python",
            "needs": ["double"],
            "config": {
                "inputs": {"x": "double.value"},
                "code": "def main(x):\n    return {'value': x * x}\n",
            },
        },
    ],
    "outputs": {"result": "square.value"},
}


@dataclass
class Gateway:
    """The served gateway and a way to speak to it as any tenant and role."""

    running: RunningGateway
    engine: Engine
    http: httpx.AsyncClient

    def token(self, tenant: str = "acme", roles: tuple[str, ...] = ("admin",), **claims: Any) -> str:
        lifetime = claims.pop("lifetime", dt.timedelta(hours=1))
        return issue_token(self.running.keys, claims.pop("subject", "tester"), tenant, list(roles), lifetime)

    async def graphql(
        self, query: str, variables: dict[str, Any] | None = None, token: str | None = None
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token or self.token()}"}
        response = await self.http.post(
            "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
        )
        body: dict[str, Any] = response.json()
        return body

    async def data(
        self, query: str, variables: dict[str, Any] | None = None, token: str | None = None
    ) -> Any:
        body = await self.graphql(query, variables, token)
        assert not body.get("errors"), body
        return body["data"]

    @contextlib.asynccontextmanager
    async def socket(self, token: str | None = None) -> AsyncIterator[Any]:
        url = self.running.url.replace("http://", "ws://") + "/graphql"
        async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
            await ws.send(
                json.dumps(
                    {
                        "type": "connection_init",
                        "payload": {"Authorization": f"Bearer {token or self.token()}"},
                    }
                )
            )
            ack = json.loads(await ws.recv())
            assert ack["type"] == "connection_ack", ack
            yield ws

    async def subscribe(
        self, query: str, variables: dict[str, Any], token: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Every `next` payload of one subscription until `complete` (or an error, raised)."""
        async with self.socket(token) as ws:
            await ws.send(
                json.dumps(
                    {"id": "1", "type": "subscribe", "payload": {"query": query, "variables": variables}}
                )
            )
            while True:
                message = json.loads(await ws.recv())
                if message["type"] == "next":
                    yield message["payload"]
                elif message["type"] == "complete":
                    return
                elif message["type"] == "error":
                    raise AssertionError(message)


@pytest.fixture(scope="module")
async def gateway(
    engine_factory: EngineFactory, tmp_path_factory: pytest.TempPathFactory, chdb_url: str
) -> AsyncIterator[Gateway]:
    home = tmp_path_factory.mktemp("gateway")
    store_url = f"sqlite:///{home / 'events.db'}"
    database = f"g_{uuid.uuid4().hex[:12]}"
    settings = Settings.from_env(
        {
            "CITADEL_HOME": str(home),
            "CITADEL_EVENT_STORE": store_url,
            "CITADEL_CLICKHOUSE": chdb_url,
            "CITADEL_PROJECTOR_GROUP": f"p-{uuid.uuid4().hex[:8]}",
            "CITADEL_PROJECTOR_BATCH_MS": "20",
            "CITADEL_GATEWAY_PORT": "0",
            "CITADEL_GATEWAY_BURST": "100000",
            "CITADEL_GATEWAY_RATE": "100000",
        }
    )
    async with (
        engine_factory(store_url=store_url) as engine,
        running_projector(settings, engine.settings.kafka, database) as projector,
        running_gateway(settings, engine, projector) as running,
        httpx.AsyncClient(base_url=running.url, timeout=30) as http,
    ):
        yield Gateway(running, engine, http)
    with Connection(chdb_url, database) as connection:
        connection.client.command(f"DROP DATABASE IF EXISTS {database}")
