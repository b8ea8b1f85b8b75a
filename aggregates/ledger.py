"""The engine's bookkeeping beside the event store: the outbox position and the set of active runs.

It lives in the same database as the events, so what the outbox has published and which
runs may still need work survive any restart together with the events themselves.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
from collections.abc import Iterable
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlparse


class Ledger(Protocol):
    def position(self, name: str) -> int: ...

    def advance(self, name: str, position: int, started: Iterable[str], finished: Iterable[str]) -> None:
        """Store `position` and update the active runs, in one transaction."""

    def active_runs(self) -> list[str]: ...

    def try_lead(self) -> bool:
        """Become the one outbox publisher of this store, or say that another process is.

        Held until close (or the process dies), so a crashed leader's place is taken at once.
        """

    def close(self) -> None: ...


def open_ledger(url: str) -> Ledger:
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        return SQLiteLedger(unquote(parsed.path))
    if parsed.scheme in ("postgresql", "postgres"):
        return PostgresLedger(url)
    raise ValueError(f"unsupported event store URL {url!r}")


_TABLES = (
    "CREATE TABLE IF NOT EXISTS citadel_positions (name TEXT PRIMARY KEY, position BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS citadel_active_runs (run_id TEXT PRIMARY KEY)",
)


class SQLiteLedger:
    def __init__(self, path: str) -> None:
        self._lock_path = f"{path}.outbox.lock"
        self._lock: int | None = None
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # as the event store: see sqlite_store
        for statement in _TABLES:
            self._db.execute(statement)

    def position(self, name: str) -> int:
        row = self._db.execute("SELECT position FROM citadel_positions WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def advance(self, name: str, position: int, started: Iterable[str], finished: Iterable[str]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO citadel_positions (name, position) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET position = excluded.position",
                (name, position),
            )
            db.executemany(
                "INSERT OR IGNORE INTO citadel_active_runs (run_id) VALUES (?)", [(r,) for r in started]
            )
            db.executemany("DELETE FROM citadel_active_runs WHERE run_id = ?", [(r,) for r in finished])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def active_runs(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT run_id FROM citadel_active_runs")]

    def try_lead(self) -> bool:
        if self._lock is not None:
            return True
        descriptor = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return False
        self._lock = descriptor
        return True

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        self._db.close()


class PostgresLedger:
    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg import sql

        parsed = urlparse(url)
        schema = parse_qs(parsed.query).get("schema", [""])[0]
        self._db: Any = psycopg.connect(parsed._replace(query="").geturl(), autocommit=True)
        if schema:
            self._db.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        # One outbox per store: the lock is named after the schema the store lives in.
        digest = hashlib.blake2b(f"citadel-outbox:{schema or 'public'}".encode(), digest_size=8)
        self._lock_key = int.from_bytes(digest.digest(), "big", signed=True)
        for statement in _TABLES:
            self._db.execute(statement)

    def position(self, name: str) -> int:
        row = self._db.execute("SELECT position FROM citadel_positions WHERE name = %s", (name,)).fetchone()
        return int(row[0]) if row else 0

    def advance(self, name: str, position: int, started: Iterable[str], finished: Iterable[str]) -> None:
        with self._db.transaction(), self._db.cursor() as cursor:
            cursor.execute(
                "INSERT INTO citadel_positions (name, position) VALUES (%s, %s) "
                "ON CONFLICT (name) DO UPDATE SET position = excluded.position",
                (name, position),
            )
            cursor.executemany(
                "INSERT INTO citadel_active_runs (run_id) VALUES (%s) ON CONFLICT DO NOTHING",
                [(r,) for r in started],
            )
            cursor.executemany("DELETE FROM citadel_active_runs WHERE run_id = %s", [(r,) for r in finished])

    def active_runs(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT run_id FROM citadel_active_runs")]

    def try_lead(self) -> bool:
        # A session-level advisory lock on the ledger's own connection: released when the
        # connection closes, including when the process dies.
        row = self._db.execute("SELECT pg_try_advisory_lock(%s)", (self._lock_key,)).fetchone()
        return bool(row[0])

    def close(self) -> None:
        self._db.close()
