"""The store every aggregate specification plays its run in: real SQLite, fresh per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregates.store import RunStore
from tests.aggregates.support import RunUnderTest


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    store = RunStore(f"sqlite:///{tmp_path}/es.db")
    yield store
    store.close()


@pytest.fixture
def run(store: RunStore) -> RunUnderTest:
    return RunUnderTest(store)
