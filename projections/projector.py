"""The projector: an aiokafka consumer that writes `citadel.run-events` into ClickHouse in batches.

A batch closes at `batch_size` events or `batch_seconds` after its first arrived, whichever
comes first, and takes whatever arrives while the batch before it is written. It is written in
the projector's one IO thread (ClickHouse calls block) and only then are its offsets committed,
so the consumer group's committed offsets are the projector's position. A batch that fails to
write is retried until it succeeds (the lag grows meanwhile).
A projector killed before it commits, or whose commit fails because its partitions moved, has
the batch delivered again (to itself or the new owner), and the projection drops what it
already holds. A clean stop stops fetching, writes and commits the batch in hand, and returns.

A plain consumer rather than a Faust agent: it hands over whole fetched batches, where an
agent's stream costs an event object, a queue hop and an acknowledgement per message, which a
saturated engine in the same process could not spare (as an agent the projector fell 5-14 s
behind the `lag` benchmark's load; now its own share, publish to visible, stays under a second).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from projections.projection import Projection
from projections.rebuild import rebuild
from schemas.envelope import Envelope, EnvelopeError, decode

log = logging.getLogger(__name__)


@dataclass
class ProjectorMetrics:
    """What the projector has done and how far behind it is."""

    events: int = 0  # new events written
    duplicates: int = 0  # redelivered events dropped
    undecodable: int = 0
    batches: int = 0
    write_errors: int = 0
    last_event_time: dt.datetime | None = None
    last_written_at: dt.datetime | None = None
    positions: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, partition) -> next offset
    highwaters: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def lag_messages(self) -> int:
        return sum(max(0, highwater - self.positions.get(tp, 0)) for tp, highwater in self.highwaters.items())

    @property
    def lag_seconds(self) -> float:
        """Age of the newest event written when it was written (commit -> visible)."""
        if self.last_event_time is None or self.last_written_at is None:
            return 0.0
        return max(0.0, (self.last_written_at - self.last_event_time).total_seconds())

    def prometheus(self) -> str:
        """The metrics in the Prometheus text format, for the gateway's /metrics."""
        lines = [
            "# TYPE citadel_projector_events_total counter",
            f"citadel_projector_events_total {self.events}",
            "# TYPE citadel_projector_duplicates_total counter",
            f"citadel_projector_duplicates_total {self.duplicates}",
            "# TYPE citadel_projector_undecodable_total counter",
            f"citadel_projector_undecodable_total {self.undecodable}",
            "# TYPE citadel_projector_write_errors_total counter",
            f"citadel_projector_write_errors_total {self.write_errors}",
            "# TYPE citadel_projector_lag_messages gauge",
            f"citadel_projector_lag_messages {self.lag_messages}",
            "# TYPE citadel_projector_lag_seconds gauge",
            f"citadel_projector_lag_seconds {self.lag_seconds:.6f}",
        ]
        for (topic, partition), highwater in sorted(self.highwaters.items()):
            lag = max(0, highwater - self.positions.get((topic, partition), 0))
            lines.append(f'citadel_projector_partition_lag{{topic="{topic}",partition="{partition}"}} {lag}')
        return "\n".join(lines) + "\n"


# Called after each written batch with its new events and when they became visible.
WrittenHook = Callable[[Sequence[Envelope], float], None]
Message: TypeAlias = ConsumerRecord[bytes, bytes]


class Projector:
    """Batches of run-event messages -> the projection, off the event loop, retried until written."""

    # How often a batch whose window has closed looks for more while the one before is written.
    WRITING_POLL_SECONDS = 0.01

    def __init__(
        self,
        projection: Projection,
        batch_size: int = 5000,
        batch_seconds: float = 0.2,
        retry_seconds: float = 1.0,
    ) -> None:
        self.projection = projection
        self.batch_size = batch_size
        self.batch_seconds = batch_seconds
        self.retry_seconds = retry_seconds
        self.metrics = ProjectorMetrics()
        self.on_written: list[WrittenHook] = []
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="citadel-projector")
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._writing = asyncio.Lock()

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        """For the consumer's `subscribe`: what the projector caches of runs is dropped whenever
        partitions are assigned. A partition that went to another projector and came back holds
        runs that one has changed since; their cached states would write stale `runs` and
        `node_attempts` rows, so they are read again from the tables."""
        return _ForgetOnAssignment(self)

    async def forget(self) -> None:
        """Drop the cached run states, after any write in progress (the one IO thread)."""
        await asyncio.get_running_loop().run_in_executor(self._io, self.projection.forget)

    def start(self, consumer: AIOKafkaConsumer) -> None:
        """Project what `consumer` fetches until `stop()`. It is started, subscribed to the run
        events in the projector's group, and commits nothing by itself (the projector commits
        each batch once it is written)."""
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(consumer), name="citadel-projector")

    async def stop(self) -> None:
        """Stop fetching; write and commit the batch in hand. The consumer is the caller's to stop."""
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        # The next batch is fetched while the last one is written: under load a write costs
        # more than the window, and what arrives meanwhile goes into the next write at once.
        writing: asyncio.Task[None] | None = None
        while True:
            batch = await self._batch(consumer, writing)
            if writing is not None:
                await writing
            if not batch:
                return  # stopping, and everything fetched is written
            writing = asyncio.create_task(self._project(consumer, batch))
            if self._stopping.is_set():
                await writing
                return

    async def _batch(self, consumer: AIOKafkaConsumer, writing: asyncio.Task[None] | None) -> list[Message]:
        """The next batch: fetched until `batch_size` messages, or until `batch_seconds` after its
        first arrived and the batch before it is written; whatever is in hand once stopping."""
        loop = asyncio.get_running_loop()
        batch: list[Message] = []
        closes_at = math.inf
        while len(batch) < self.batch_size and not self._stopping.is_set():
            wait = min(closes_at - loop.time(), self.batch_seconds)
            if wait <= 0:
                if writing is None or writing.done():
                    break
                wait = self.WRITING_POLL_SECONDS
            try:
                fetched = await consumer.getmany(
                    timeout_ms=round(wait * 1000), max_records=self.batch_size - len(batch)
                )
            except KafkaError:
                # The messages in hand are past the consumer's position: write them before anything.
                log.exception("the projector's consumer failed; fetching again")
                if batch:
                    break
                await asyncio.sleep(self.retry_seconds)
                continue
            for messages in fetched.values():
                batch.extend(messages)
            if not batch:
                if writing is None or writing.done():
                    await self._idle_positions(consumer)
            elif closes_at == math.inf:
                closes_at = loop.time() + self.batch_seconds
        return batch

    async def _idle_positions(self, consumer: AIOKafkaConsumer) -> None:
        """With nothing in hand, all that was fetched is written: the consumer's positions are the
        projector's (this is how partitions committed before this start, with nothing new, count
        as projected)."""
        positions = self.metrics.positions
        for tp in consumer.assignment():
            try:
                # Not known until the group's committed offset is read: then it counts later.
                position = await asyncio.wait_for(consumer.position(tp), self.batch_seconds)
            except (KafkaError, TimeoutError):
                continue
            key = (tp.topic, tp.partition)
            positions[key] = max(positions.get(key, 0), position)

    async def _commit(self, consumer: AIOKafkaConsumer, batch: Sequence[Message]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for message in batch:
            tp = TopicPartition(message.topic, message.partition)
            offsets[tp] = max(offsets.get(tp, 0), message.offset + 1)
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The partitions moved meanwhile: their new owner gets the batch again, and the
            # projection drops what it already holds.
            log.info("projector offsets not committed (%s); the batch is delivered again", exc)

    async def _project(self, consumer: AIOKafkaConsumer, batch: Sequence[Message]) -> None:
        if await self.write(batch):
            await self._commit(consumer, batch)

    async def write(self, messages: Sequence[Message]) -> bool:
        """Project a batch of messages, skipping undecodable ones; False if it was not written
        because the projector stops (it is delivered again: nothing was committed)."""
        envelopes = []
        for message in messages:
            try:
                envelopes.append(decode(message.value))
            except EnvelopeError as exc:
                self.metrics.undecodable += 1
                log.warning("projector skips an undecodable run event at offset %s: %s", message.offset, exc)
        async with self._writing:
            return await self._write(messages, envelopes)

    async def _write(self, messages: Sequence[Message], envelopes: list[Envelope]) -> bool:
        loop = asyncio.get_running_loop()
        while True:
            duplicates = self.projection.duplicates
            try:
                written = await loop.run_in_executor(self._io, self.projection.write, envelopes)
                break
            except Exception:
                self.metrics.write_errors += 1
                if self._stopping.is_set():
                    log.exception(
                        "projecting %d run events failed while stopping; left for the next start",
                        len(envelopes),
                    )
                    return False
                log.exception("projecting %d run events failed; retrying", len(envelopes))
                await asyncio.sleep(self.retry_seconds)
        now = time.time()
        metrics = self.metrics
        metrics.batches += 1
        metrics.events += written
        metrics.duplicates += self.projection.duplicates - duplicates
        if envelopes:
            metrics.last_event_time = max(e.time for e in envelopes)
            metrics.last_written_at = dt.datetime.fromtimestamp(now, dt.UTC)
        for message in messages:
            tp = (message.topic, message.partition)
            metrics.positions[tp] = max(metrics.positions.get(tp, 0), message.offset + 1)
        self._update_highwaters()
        for hook in self.on_written:
            hook(envelopes, now)
        return True

    async def rebuild(self, history: Iterable[Envelope]) -> int:
        """Rebuild every projection from `history` and swap it in (projections/rebuild.py), with
        this projector's own connection and thread, while no batch is written; then go on from
        where it was, into the new tables, with the runs' states read from them afresh."""
        async with self._writing:
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(self._io, rebuild, self.projection.client, history)
            finally:
                await self.forget()

    def _update_highwaters(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        try:
            for tp in consumer.assignment():
                self.metrics.highwaters[(tp.topic, tp.partition)] = consumer.highwater(tp) or 0
        except Exception:  # no consumer yet, or mid-rebalance: keep the last figures
            log.debug("highwaters unavailable", exc_info=True)

    async def drain(self, timeout: float = 10.0, settle: float = 0.3) -> bool:
        """Wait until every assigned partition is projected to its end and stays so for `settle`
        seconds (a clean stop leaves nothing published unprojected); False after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        settled_since: float | None = None
        while loop.time() < deadline:
            self._update_highwaters()
            metrics = self.metrics
            # No partitions yet (the group is still joining) is not caught up.
            caught_up = bool(metrics.highwaters) and all(
                metrics.positions.get(tp, 0) >= hw for tp, hw in metrics.highwaters.items()
            )
            if not caught_up:
                settled_since = None
            elif settled_since is None:
                settled_since = loop.time()
            elif loop.time() - settled_since >= settle:
                return True
            await asyncio.sleep(0.05)
        log.warning("the projector stopped %d messages behind", self.metrics.lag_messages)
        return False

    def close(self) -> None:
        self._io.shutdown(wait=True)


class _ForgetOnAssignment(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, projector: Projector) -> None:
        self.projector = projector

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Nothing to do: a batch whose commit fails now is delivered again and deduplicated."""

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.projector.forget()
