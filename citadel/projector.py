"""Wiring of the projections: the ClickHouse they live in, migrated on open, and the live projector.

Embedded mode keeps them in chDB under $CITADEL_HOME/clickhouse, which one process at a time
may open: `citadel up` runs the projector in its own process, and whatever else reads the
projections there (the gateway, dashboards) shares that process's engine through its own
connection. With CITADEL_CLICKHOUSE the projector writes to that server and any number of
processes read it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer

from citadel.settings import Settings
from projections.clickhouse import Connection
from projections.projection import Projection
from projections.projector import Projector
from projections.schema import migrate
from streams.kafka import RUN_EVENTS, FetchTuner, KafkaSettings, group_consumer


def open_projections(settings: Settings, database: str | None = None) -> Connection:
    """A connection to the projections' database, with every migration applied."""
    connection = Connection(settings.clickhouse_url, database)
    try:
        migrate(connection.client, settings.audit_retention_days)
    except Exception:
        connection.close()
        raise
    return connection


@dataclass
class RunningProjector:
    projector: Projector
    connection: Connection
    consumer: AIOKafkaConsumer


@contextlib.asynccontextmanager
async def running_projector(
    settings: Settings, kafka: KafkaSettings, database: str | None = None
) -> AsyncIterator[RunningProjector]:
    """The projector on `citadel.run-events` (its own consumer group), started; on leaving, it
    projects what was published before and stops cleanly."""
    connection = open_projections(settings, database)
    projector = Projector(
        Projection(connection.client),
        batch_size=settings.projector_batch,
        batch_seconds=settings.projector_batch_seconds,
    )
    consumer = group_consumer(kafka, settings.projector_group, max_poll_records=settings.projector_batch)
    consumer.subscribe([kafka.topic(RUN_EVENTS)], listener=projector.rebalance_listener())
    # The embedded broker answers a waiting fetch only when the wait is over: short while
    # batches come, growing with a lull (streams/kafka.py).
    tuner = FetchTuner(kafka)
    tuner.register(consumer)
    projector.on_written.append(lambda _envelopes, _at: tuner.activity())
    tuning = asyncio.create_task(tuner.run(), name="citadel-projector-fetch-tuner")
    try:
        await consumer.start()
        projector.start(consumer)
        yield RunningProjector(projector, connection, consumer)
        await projector.drain()
    finally:
        try:
            await projector.stop()
        finally:
            tuning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tuning
            await consumer.stop()
            projector.close()
            connection.close()
