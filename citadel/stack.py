"""Wiring: the embedded broker (when no Kafka is configured), the executors, the engine, the projector."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from citadel.projector import RunningProjector, running_projector
from citadel.settings import Settings
from citadel.telemetry import REDACTION, RevealedSecrets
from nodes.base import ExecutorRegistry
from nodes.http import HttpExecutor
from nodes.javascript import JavaScriptExecutor
from nodes.kafka import KafkaExecutor
from nodes.python import PythonExecutor
from nodes.secrets import EnvironmentSecrets, FileSecrets, SecretStore
from streams.admission import Limits
from streams.broker import EmbeddedBroker
from streams.engine import Engine, EngineSettings
from streams.kafka import KafkaSettings, ensure_topics


@dataclass
class Stack:
    settings: Settings
    kafka: KafkaSettings
    engine: Engine
    broker: EmbeddedBroker | None
    projector: RunningProjector | None = None


def kafka_settings(settings: Settings, bootstrap: str) -> KafkaSettings:
    if settings.embedded:
        return KafkaSettings.for_embedded(bootstrap, settings.partitions, settings.namespace)
    return KafkaSettings.for_cluster(bootstrap, settings.partitions, settings.namespace)


@contextlib.asynccontextmanager
async def running_stack(
    settings: Settings, keep_broker: bool = False, project: bool | None = None
) -> AsyncIterator[Stack]:
    """Start everything; with `keep_broker`, the embedded broker outlives a crash of this process.

    The projector runs here too unless `project` is False. By default it does in embedded mode
    (chDB's data directory belongs to this one process) and, in production, when
    CITADEL_CLICKHOUSE names the server to project into."""
    if project is None:
        project = settings.embedded or settings.clickhouse is not None
    settings.home.mkdir(parents=True, exist_ok=True)
    broker = None
    if settings.embedded:
        broker = _adopt_broker(settings) if keep_broker else None
        if broker is None:
            broker = EmbeddedBroker(log_path=str(settings.home / "broker.log"), detached=keep_broker)
            await broker.start_async()
            if keep_broker:
                _write_atomically(
                    _broker_file(settings), json.dumps({"port": broker.port, "pid": broker.pid})
                )
        bootstrap = broker.bootstrap
    else:
        assert settings.kafka is not None
        bootstrap = settings.kafka
    kafka = kafka_settings(settings, bootstrap)
    secrets = secret_store(settings)
    executors = executor_registry(settings, secrets, bootstrap)
    engine = Engine(
        EngineSettings(
            kafka=kafka,
            store_url=settings.event_store,
            datadir=str(settings.home / "faust"),
            group=settings.group,
            snapshot_interval=settings.snapshot_interval,
            trigger_batch=settings.trigger_batch,
            executor_concurrency=settings.executor_concurrency,
            admission=Limits(
                tenant=settings.tenant_concurrency,
                workflow=settings.workflow_concurrency,
                node_types=settings.node_type_concurrency,
            ),
            egress_private=settings.egress_private,
        ),
        executors,
        secrets=secrets,
    )
    try:
        async with contextlib.AsyncExitStack() as projecting:
            # Engine and projector start side by side: each waits for its consumer group to join.
            await ensure_topics(kafka)
            starting = asyncio.ensure_future(engine.start())
            try:
                projector = None
                if project:
                    projector = await projecting.enter_async_context(running_projector(settings, kafka))
            finally:
                await starting
            yield Stack(settings=settings, kafka=kafka, engine=engine, broker=broker, projector=projector)
    finally:
        await engine.stop()
        if broker is not None:
            broker.stop()
            with contextlib.suppress(FileNotFoundError):
                _broker_file(settings).unlink()


def secret_store(settings: Settings) -> SecretStore:
    """Where node executors, webhooks and notifications read secrets from. Whatever value it
    hands out, no log line of this process may show."""
    store = FileSecrets(settings.secrets_dir) if settings.secrets_dir else EnvironmentSecrets()
    return RevealedSecrets(store, REDACTION)


def executor_registry(settings: Settings, secrets: SecretStore, bootstrap: str) -> ExecutorRegistry:
    def concurrency(node_type: str) -> int:
        # A node type's limit also caps its executor here, so one worker never runs more of it.
        limit = settings.node_type_concurrency.get(node_type, settings.executor_concurrency)
        return min(settings.executor_concurrency, limit)

    return ExecutorRegistry(
        [
            PythonExecutor(
                max_concurrency=concurrency("python"),
                allow_network=settings.allow_network,
                packages=None
                if settings.sandbox_packages is None
                else [str(p) for p in settings.sandbox_packages],
                scratch_bytes=settings.sandbox_scratch_mb * 2**20,
                sandbox_uid=settings.sandbox_uid,
            ),
            JavaScriptExecutor(max_concurrency=concurrency("javascript"), sandbox_uid=settings.sandbox_uid),
            HttpExecutor(secrets, max_concurrency=concurrency("http"), allow_private=settings.egress_private),
            KafkaExecutor(bootstrap),
        ]
    )


def _broker_file(settings: Settings) -> Path:
    return settings.home / "broker.json"


def _adopt_broker(settings: Settings) -> EmbeddedBroker | None:
    try:
        info = json.loads(_broker_file(settings).read_text())
        return EmbeddedBroker.adopt(int(info["port"]), int(info["pid"]))
    except (FileNotFoundError, ValueError, KeyError):
        return None


# A running `citadel up` announces itself here so `citadel run` can submit to it.


def engine_file(settings: Settings) -> Path:
    return settings.home / "engine.json"


def announce(stack: Stack, gateway_url: str | None = None) -> None:
    info = {
        "pid": os.getpid(),
        "bootstrap": stack.kafka.bootstrap,
        "partitions": stack.kafka.partitions,
        "namespace": stack.kafka.namespace,
        "event_store": stack.settings.event_store,
        "gateway": gateway_url,
    }
    _write_atomically(engine_file(stack.settings), json.dumps(info))


def _write_atomically(path: Path, text: str) -> None:
    """Readers (`citadel run`, the broker's adopter) never see the file half written."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def withdraw(settings: Settings) -> None:
    with contextlib.suppress(FileNotFoundError):
        engine_file(settings).unlink()


@dataclass(frozen=True)
class RunningEngine:
    """A live `citadel up` for this home: its broker and topics, and its gateway if it serves one."""

    kafka: KafkaSettings
    gateway: str | None


def running_engine(settings: Settings) -> RunningEngine | None:
    """Where a live `citadel up` for this home listens, if there is one (from its engine file)."""
    try:
        info: dict[str, Any] = json.loads(engine_file(settings).read_text())
        os.kill(int(info["pid"]), 0)
        bootstrap = str(info["bootstrap"])
    except (FileNotFoundError, ValueError, KeyError, ProcessLookupError, PermissionError):
        return None
    # Its partitions and topic prefix, whatever this process's own settings say.
    announced = settings.model_copy(
        update={
            "partitions": int(info.get("partitions", settings.partitions)),
            "namespace": str(info.get("namespace", settings.namespace)),
        }
    )
    gateway = info.get("gateway")
    return RunningEngine(kafka_settings(announced, bootstrap), gateway if isinstance(gateway, str) else None)
