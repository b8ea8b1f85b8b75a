"""Connections to the projections' ClickHouse: chDB in-process (`chdb:///path`) or a server (`http://...`).

chDB runs one engine per process and lets one process at a time use a data directory. Inside
the process any number of clients share that engine (each with its own handle, so the
projector's writes and the queries' reads never wait on one another's calls); across
processes a lock file beside the data names the holder, so a second process gets an error
that says who holds the directory instead of chDB's bare "Error initializing EmbeddedServer".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client

DEFAULT_DATABASE = "citadel"


class ClickHouseUnavailable(RuntimeError):
    """The projections' ClickHouse cannot be opened; the message says why and what to do."""


def is_embedded(url: str) -> bool:
    return url.startswith("chdb:")


def chdb_path(url: str) -> Path:
    return Path(unquote(urlparse(url).path)).resolve()


class _EmbeddedLock:
    """This process's claim on a chDB data directory, held while any client of it is open."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: dict[Path, tuple[int, int]] = {}  # path -> (lock fd, open clients)

    def acquire(self, path: Path) -> None:
        with self._mutex:
            if path in self._held:
                fd, count = self._held[path]
                self._held[path] = (fd, count + 1)
                return
            path.mkdir(parents=True, exist_ok=True)
            lock_path = path.parent / f"{path.name}.lock"
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ClickHouseUnavailable(
                    f"the chDB data directory {path} is in use by process {holder} (chDB allows one "
                    "process per directory); stop that process (e.g. `citadel up`) and try again, "
                    "or point CITADEL_CLICKHOUSE at a ClickHouse server"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._held[path] = (fd, 1)

    def release(self, path: Path) -> None:
        with self._mutex:
            fd, count = self._held[path]
            if count > 1:
                self._held[path] = (fd, count - 1)
                return
            del self._held[path]
            os.close(fd)  # closing the descriptor releases the flock


_LOCK = _EmbeddedLock()


class Connection:
    """One client of the projections' database, closed with `close()` (or as a context manager)."""

    def __init__(self, url: str, database: str | None = None) -> None:
        self.url = url
        self._path: Path | None = None
        if is_embedded(url):
            self._path = chdb_path(url)
            self.database = database or DEFAULT_DATABASE
            _LOCK.acquire(self._path)
            try:
                self.client = _open(f"chdb://{self._path}", self.database)
            except Exception:
                _LOCK.release(self._path)
                raise
        else:
            self.database = database or urlparse(url).path.strip("/") or DEFAULT_DATABASE
            self.client = _open(url, self.database)

    def close(self) -> None:
        self.client.close()
        if self._path is not None:
            _LOCK.release(self._path)
            self._path = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def _open(url: str, database: str) -> Client:
    # The database may not exist yet: connect without one, create it, then use it.
    try:
        bootstrap = clickhouse_connect.get_client(dsn=url, database="default")
    except Exception as exc:
        raise ClickHouseUnavailable(f"cannot open ClickHouse at {_redact(url)}: {exc}") from exc
    try:
        bootstrap.command(f"CREATE DATABASE IF NOT EXISTS {_identifier(database)}")
    finally:
        bootstrap.close()
    return clickhouse_connect.get_client(dsn=url, database=database)


def _identifier(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ClickHouseUnavailable(f"database name {name!r} must be letters, digits and underscores")
    return f"`{name}`"


def _redact(url: str) -> str:
    parsed = urlparse(url)
    return url.replace(f":{parsed.password}@", ":***@") if parsed.password else url


@contextlib.contextmanager
def connected(url: str, database: str | None = None) -> Iterator[Connection]:
    connection = Connection(url, database)
    try:
        yield connection
    finally:
        connection.close()
