"""A partition that goes to another projector and comes back: the runs it holds are read again
from the tables, not taken from what this projector cached before it went."""

from __future__ import annotations

from aiokafka import TopicPartition

from projections.clickhouse import Connection
from projections.projection import Projection
from projections.projector import Projector
from projections.rebuild import contents
from tests.projections.conftest import fresh_database
from tests.projections.support import Attempt, run_history

STEPS = [
    Attempt("fetch", "http", "failed", 120.0, "TimeoutError"),
    Attempt("fetch", "http", "succeeded", 80.0),
    Attempt("shape", "transform", "succeeded", 5.0),
]


async def test_a_partition_that_comes_back_is_projected_from_the_tables(
    projections_db: Connection, chdb_url: str
) -> None:
    events = run_history("orders", STEPS)
    ours = Projector(Projection(projections_db.client))
    try:
        ours.projection.write(events[:3])  # this projector owns the run's partition
        # The partition moves to another projector, which schedules `shape`.
        Projection(projections_db.client).write(events[3:6])
        # It comes back: the consumer tells the projector, as aiokafka does on every assignment.
        await ours.rebalance_listener().on_partitions_assigned([TopicPartition("run-events", 0)])
        ours.projection.write(events[6:])  # `shape` succeeded, the run completed
    finally:
        ours.close()

    with fresh_database(chdb_url) as one_projector:
        Projection(one_projector.client).write(events)
        assert contents(projections_db.client) == contents(one_projector.client)
