"""Wiring of the gateway into a running engine: its backend, keys, metrics and readiness, served by uvicorn.

The gateway runs in the engine's process (`citadel up`, `citadel worker`): live subscriptions
take run events straight from the engine's outbox while it publishes (and, where several
workers share the store, from `citadel.run-events`), and in embedded mode it reads the chDB
projections through a connection of this same process (chDB's data directory belongs to one).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from aggregates.store import RunStore
from citadel.projector import RunningProjector
from citadel.settings import Settings
from gateway.app import GatewayConfig, create_app
from gateway.auth import TokenKeys, issue_token
from gateway.backend import Backend
from gateway.live import KafkaTail, RunEventHub
from gateway.metrics import GatewayMetrics
from projections.clickhouse import Connection
from projections.queries import Analytics
from streams.engine import Engine


@dataclass
class RunningGateway:
    url: str
    backend: Backend
    keys: TokenKeys
    development_token: str | None  # embedded mode only


def token_keys(settings: Settings) -> TokenKeys:
    """The configured keys; in embedded mode without any, a development secret kept in the home.

    Production settings have no fallback: a gateway without keys refuses to start."""
    secret, public_key = settings.jwt_secret, settings.jwt_public_key
    if secret is None and public_key is None:
        if not settings.embedded:
            raise ValueError(
                "the gateway needs CITADEL_JWT_SECRET (HS256) or CITADEL_JWT_PUBLIC_KEY (RS256) "
                "to check bearer tokens; or set CITADEL_GATEWAY_PORT=0 to run without a gateway"
            )
        secret = _development_secret(settings)
    return TokenKeys(settings.jwt_issuer, settings.jwt_audience, secret, public_key)


def _development_secret(settings: Settings) -> str:
    path = settings.home / "gateway.secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the engine's own loop handles SIGINT/SIGTERM and stops us


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, engine: Engine, projector: RunningProjector | None, tail: bool | None = None
) -> AsyncIterator[RunningGateway]:
    """Serve the gateway on the settings' host and port (0: any free port) until the block ends.

    Live events come from this engine's outbox while it publishes; with `tail` (by default in
    production, where other workers may publish) also from `citadel.run-events` itself."""
    keys = token_keys(settings)
    hub = RunEventHub()
    engine.published_listeners.append(hub.publish)
    engine.rejected_listeners.append(hub.reject)
    kafka_tail = (
        KafkaTail(engine.settings.kafka, hub) if (not settings.embedded if tail is None else tail) else None
    )
    metrics = GatewayMetrics({t: settings.executor_concurrency for t in engine.executors.node_types})
    hub.listeners.append(metrics.observe)
    connection = None
    if projector is not None or settings.clickhouse is not None:
        connection = Connection(settings.clickhouse_url, projector.connection.database if projector else None)
    if projector is not None:
        metrics.sources.append(projector.projector.metrics.prometheus)
    store = RunStore(settings.event_store)
    analytics = Analytics(connection.client) if connection else None
    rebuild = projector.projector.rebuild if projector is not None else None
    backend = Backend(store, engine.submit, hub, analytics, engine.secrets, rebuild)
    checks: dict[str, Any] = {
        "broker": lambda: _broker_answers(engine),
        "event_store": lambda: backend.in_store(store.recorder.max_notification_id),
    }
    if connection is not None:
        checks["clickhouse"] = lambda: backend.in_clickhouse(connection.client.command, "SELECT 1")
    config = GatewayConfig(
        keys,
        rate_per_second=settings.gateway_rate,
        rate_burst=settings.gateway_burst,
        max_request_bytes=settings.gateway_max_request_bytes,
    )
    app = create_app(backend, config, metrics, checks)
    server = _Server(
        uvicorn.Config(
            app,
            host=settings.gateway_host,
            port=settings.gateway_port,
            log_config=None,
            lifespan="off",
            ws="websockets-sansio",
            ws_max_size=settings.gateway_max_request_bytes,
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        if kafka_tail is not None:
            await kafka_tail.start()
        while not server.started:
            if serving.done():
                serving.result()  # the port is taken, say: raise why
                raise RuntimeError("the gateway stopped while starting")
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        token = None
        if settings.embedded and settings.jwt_secret is None and settings.jwt_public_key is None:
            token = issue_token(keys, "developer", "default", ["admin"], lifetime=dt.timedelta(days=7))
        yield RunningGateway(f"http://{settings.gateway_host}:{port}", backend, keys, token)
    finally:
        engine.published_listeners.remove(hub.publish)
        engine.rejected_listeners.remove(hub.reject)
        if kafka_tail is not None:
            await kafka_tail.stop()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await serving
        backend.close()
        store.close()
        if connection is not None:
            connection.close()


async def _broker_answers(engine: Engine) -> None:
    assert engine.producer is not None
    await engine.producer.client.fetch_all_metadata()
