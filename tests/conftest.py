"""Fixtures that start real parts once per session: the embedded broker, engines on it."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from nodes.base import ExecutorRegistry
from nodes.http import HttpExecutor
from nodes.javascript import JavaScriptExecutor
from nodes.kafka import KafkaExecutor
from nodes.python import PythonExecutor
from nodes.secrets import EnvironmentSecrets
from streams.admission import Limits
from streams.broker import EmbeddedBroker
from streams.clock import Clock
from streams.engine import Engine, EngineSettings
from streams.kafka import KafkaSettings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def chdb_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's chDB data directory: chDB opens one per process, so every test shares it
    (each in a database of its own)."""
    return f"chdb://{tmp_path_factory.mktemp('chdb')}/data"


@pytest.fixture(scope="session")
def bootstrap() -> Any:
    """The session's Kafka: a real cluster at CITADEL_KAFKA, else one embedded broker."""
    if os.environ.get("CITADEL_KAFKA"):
        yield os.environ["CITADEL_KAFKA"]
        return
    broker = EmbeddedBroker()
    broker.start()
    yield broker.bootstrap
    broker.stop()


def kafka_for(bootstrap: str, partitions: int = 4) -> KafkaSettings:
    """Settings with a fresh topic namespace, so tests sharing the broker never meet."""
    namespace = f"t{uuid.uuid4().hex[:10]}."
    if os.environ.get("CITADEL_KAFKA"):
        return KafkaSettings.for_cluster(bootstrap, partitions, namespace)
    return KafkaSettings.for_embedded(bootstrap, partitions, namespace)


EngineFactory = Callable[..., contextlib.AbstractAsyncContextManager[Engine]]


@pytest.fixture(scope="session")
def engine_factory(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> EngineFactory:
    @contextlib.asynccontextmanager
    async def start(
        store_url: str | None = None,
        kafka: KafkaSettings | None = None,
        python_concurrency: int = 4,
        clock: Clock | None = None,
        **overrides: Any,
    ) -> AsyncIterator[Engine]:
        home = tmp_path_factory.mktemp("engine")
        kafka = kafka or kafka_for(bootstrap)
        # Admission as `citadel up` sets it: a tenant may keep four rounds of the executors busy.
        overrides.setdefault("admission", Limits(tenant=4 * python_concurrency))
        settings = EngineSettings(
            kafka=kafka,
            store_url=store_url or f"sqlite:///{home}/events.db",
            datadir=str(home / "faust"),
            group=f"g-{kafka.namespace}",
            **overrides,
        )
        executors = ExecutorRegistry(
            [
                PythonExecutor(max_concurrency=python_concurrency),
                JavaScriptExecutor(max_concurrency=2),
                HttpExecutor(EnvironmentSecrets(), max_concurrency=4),
                KafkaExecutor(kafka.bootstrap),
            ]
        )
        engine = Engine(settings, executors, clock)
        await engine.start()
        try:
            yield engine
        finally:
            await engine.stop()

    return start


@pytest.fixture(scope="module")
async def engine(engine_factory: EngineFactory) -> AsyncIterator[Engine]:
    """One engine shared by the tests of a module (each start costs a consumer-group join)."""
    async with engine_factory() as running:
        yield running
