"""A fresh, migrated projections database per test (or per module), in the session's chDB."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest

from projections.clickhouse import Connection
from projections.schema import migrate


@contextlib.contextmanager
def fresh_database(chdb_url: str) -> Iterator[Connection]:
    connection = Connection(chdb_url, f"t_{uuid.uuid4().hex[:12]}")
    migrate(connection.client)
    try:
        yield connection
    finally:
        connection.client.command(f"DROP DATABASE IF EXISTS {connection.database}")
        connection.close()


@pytest.fixture
def projections_db(chdb_url: str) -> Iterator[Connection]:
    with fresh_database(chdb_url) as connection:
        yield connection
