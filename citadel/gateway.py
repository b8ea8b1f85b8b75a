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
from aiokafka import AIOKafkaProducer

from aggregates.store import RunStore
from citadel.projector import RunningProjector
from citadel.settings import Settings
from citadel.stack import kafka_settings, secret_store
from gateway.app import GatewayConfig, create_app
from gateway.auth import TokenKeys, issue_token
from gateway.backend import Backend
from gateway.live import KafkaTail, RunEventHub
from gateway.metrics import GatewayMetrics
from nodes.secrets import SecretStore
from projections.clickhouse import Connection
from projections.queries import Analytics
from schemas.envelope import Envelope
from streams.engine import Engine
from streams.kafka import KafkaSettings, producer, send_command


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


@dataclass
class EngineLink:
    """How a gateway reaches the engine: its topics, a producer for commands, its secrets, the
    node types it runs, and, in the engine's own process, the engine itself."""

    kafka: KafkaSettings
    producer: AIOKafkaProducer
    secrets: SecretStore
    node_types: tuple[str, ...]
    engine: Engine | None = None

    @classmethod
    def of(cls, engine: Engine) -> EngineLink:
        assert engine.producer is not None
        return cls(
            engine.settings.kafka, engine.producer, engine.secrets, engine.executors.node_types, engine
        )

    async def submit(self, command: Envelope) -> None:
        if self.engine is not None:
            await self.engine.submit(command)
            return
        await send_command(self.producer, self.kafka, command)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, engine: Engine, projector: RunningProjector | None, tail: bool | None = None
) -> AsyncIterator[RunningGateway]:
    """Serve the gateway in the engine's process on the settings' host and port (0: any free
    port) until the block ends.

    Live events come from this engine while it publishes; with `tail` (by default in production,
    where other workers may publish) also from `citadel.run-events` itself."""
    link = EngineLink.of(engine)
    with_tail = not settings.embedded if tail is None else tail
    async with serving_gateway(settings, link, projector, with_tail) as running:
        yield running


@contextlib.asynccontextmanager
async def standalone_gateway(settings: Settings) -> AsyncIterator[RunningGateway]:
    """A gateway in a process of its own (`citadel gateway`): commands go to the engine's topic,
    live events come from `citadel.run-events`, analytics from CITADEL_CLICKHOUSE's server."""
    if settings.kafka is None:
        raise ValueError(
            "a gateway of its own needs CITADEL_KAFKA (the engine's broker); in embedded mode "
            "`citadel up` serves the gateway itself"
        )
    kafka = kafka_settings(settings, settings.kafka)
    commands = producer(kafka)
    await commands.start()
    try:
        link = EngineLink(kafka, commands, secret_store(settings), ())
        async with serving_gateway(settings, link, None, tail=True) as running:
            yield running
    finally:
        await commands.stop()


@contextlib.asynccontextmanager
async def serving_gateway(
    settings: Settings, link: EngineLink, projector: RunningProjector | None, tail: bool
) -> AsyncIterator[RunningGateway]:
    keys = token_keys(settings)
    hub = RunEventHub()
    engine = link.engine
    if engine is not None:
        engine.published_listeners.append(hub.publish)
        engine.rejected_listeners.append(hub.reject)
    kafka_tail = KafkaTail(link.kafka, hub) if tail else None
    metrics = GatewayMetrics({t: settings.executor_concurrency for t in link.node_types})
    hub.listeners.append(metrics.observe)
    connection = None
    if projector is not None or settings.clickhouse is not None:
        connection = Connection(settings.clickhouse_url, projector.connection.database if projector else None)
    if projector is not None:
        metrics.sources.append(projector.projector.metrics.prometheus)
    store = RunStore(settings.event_store)
    analytics = Analytics(connection.client) if connection else None
    rebuild = projector.projector.rebuild if projector is not None else None
    backend = Backend(store, link.submit, hub, analytics, link.secrets, rebuild)
    checks: dict[str, Any] = {
        "broker": link.producer.client.fetch_all_metadata,
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
        if engine is not None:
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
