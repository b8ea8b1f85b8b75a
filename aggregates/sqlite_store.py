"""The `eventsourcing` SQLite persistence with one change: `synchronous=NORMAL` in WAL mode.

In WAL mode NORMAL keeps every committed transaction across a crash of the process (SIGKILL
included) and skips the fsync of each commit; only an operating-system crash can lose the
last commits. Chosen with PERSISTENCE_MODULE, the library's own seam.
"""

from __future__ import annotations

from eventsourcing import sqlite
from eventsourcing.utils import Environment


class _Pool(sqlite.SQLiteConnectionPool):
    def _create_connection(self) -> sqlite.SQLiteConnection:
        connection = super()._create_connection()
        connection._sqlite_conn.execute("PRAGMA synchronous=NORMAL")
        return connection


class Factory(sqlite.SQLiteFactory):
    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        pool = self.datastore.pool
        self.datastore.pool = _Pool(db_name=pool.db_name, lock_timeout=pool.lock_timeout)
