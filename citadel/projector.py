"""Wiring of the projections: the ClickHouse they live in, migrated on open, and the live projector.

Embedded mode keeps them in chDB under $CITADEL_HOME/clickhouse, which one process at a time
may open: `citadel up` runs the projector in its own process, and whatever else reads the
projections there (the gateway, dashboards) shares that process's engine through its own
connection. With CITADEL_CLICKHOUSE the projector writes to that server and any number of
processes read it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from citadel.settings import Settings
from projections.clickhouse import Connection
from projections.projection import Projection
from projections.projector import Projector
from projections.schema import migrate
from streams.kafka import RUN_EVENTS, KafkaSettings, StreamApp, stream_app


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
    app: StreamApp


@contextlib.asynccontextmanager
async def running_projector(
    settings: Settings, kafka: KafkaSettings, database: str | None = None
) -> AsyncIterator[RunningProjector]:
    """The projector's Faust app (its own consumer group) on `citadel.run-events`, started."""
    connection = open_projections(settings, database)
    projector = Projector(
        Projection(connection.client),
        batch_size=settings.projector_batch,
        batch_seconds=settings.projector_batch_seconds,
    )
    app = stream_app(settings.projector_group, kafka, str(settings.home / "faust-projector"))
    projector.register(app, kafka.topic(RUN_EVENTS), kafka.partitions)
    try:
        await app.start()
        yield RunningProjector(projector, connection, app)
        await projector.drain()
    finally:
        with contextlib.suppress(Exception):  # a half-started Faust app may fail to stop
            await app.stop()
        projector.close()
        connection.close()
