"""A fresh PostgreSQL schema per test on the local server (127.0.0.1:5432, database `test`)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

PG_URL = os.environ.get("CITADEL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.contextmanager
def fresh_schema() -> Iterator[str]:
    """Yield a store URL for a new, empty schema; drop the schema afterwards."""
    name = f"citadel_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_URL, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"the local PostgreSQL at {PG_URL} is not reachable ({exc}); start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        )
    with admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        try:
            yield f"{PG_URL}?schema={name}"
        finally:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
