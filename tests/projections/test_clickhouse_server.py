"""The projections on a real ClickHouse server, at CITADEL_CLICKHOUSE (http://user:pass@host:8123).

Skipped, saying so, when no server is configured: none can be installed on the build machine.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from projections.clickhouse import Connection
from projections.projection import Projection
from projections.queries import Analytics
from projections.rebuild import contents, rebuild
from projections.schema import migrate
from tests.projections.support import T0, Attempt, run_history

SERVER = os.environ.get("CITADEL_CLICKHOUSE", "")
pytestmark = pytest.mark.skipif(
    not SERVER.startswith(("http://", "https://")),
    reason="needs a ClickHouse server: set CITADEL_CLICKHOUSE=http://user:pass@host:8123 "
    "(docker compose -f docker-compose.kafka.yml up -d clickhouse)",
)


@pytest.fixture
def server_db() -> Iterator[Connection]:
    connection = Connection(SERVER, f"citadel_test_{uuid.uuid4().hex[:10]}")
    try:
        migrate(connection.client)
        yield connection
    finally:
        connection.client.command(f"DROP DATABASE IF EXISTS {connection.database}")
        connection.close()


def test_server_projection_is_idempotent_and_equals_its_rebuild(server_db: Connection) -> None:
    histories = [
        run_history("orders", [Attempt("a", "python", "succeeded", 5.0)]),
        run_history("orders", [Attempt("a", "python", "failed", 9.0, "ValueError")], end="Failed"),
    ]
    events = [e for history in histories for e in history]
    Projection(server_db.client).write(events[:5])
    Projection(server_db.client).write(events)  # a restarted projector, everything again
    live = contents(server_db.client)
    assert len(live["events"]) == len(events)
    assert rebuild(server_db.client, iter(events)) == len(events)
    assert contents(server_db.client) == live
    analytics = Analytics(server_db.client)
    window = (T0.replace(hour=0), T0.replace(hour=23))
    assert {r["status"]: r["runs"] for r in analytics.runs_by_status("acme", *window)} == {
        "completed": 1,
        "failed": 1,
    }
    assert analytics.runs_by_status("acme' OR '1'='1", *window) == []
    assert migrate(server_db.client) == []
