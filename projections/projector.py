"""The projector: a Faust agent that writes `citadel.run-events` into ClickHouse in batches.

A batch closes at `batch_size` events or after `batch_seconds`, whichever comes first; it is
written in a thread (ClickHouse calls block) and only then acknowledged, so the consumer
group's committed offsets are the projector's position. A batch that fails to write is
retried until it succeeds (the lag grows meanwhile); a projector killed before it commits
gets the batch again, and the projection drops what it already holds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

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


class Projector:
    """Batches of run-event messages -> the projection, off the event loop, retried until written."""

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
        self._app: Any = None
        self._writing = asyncio.Lock()

    def register(self, app: Any, topic: str, partitions: int) -> None:
        """Add the projector's agent to a Faust app (before the app starts)."""
        channel = app.topic(topic, key_serializer="raw", value_serializer="raw", partitions=partitions)
        app.agent(channel, name="project")(self._agent)
        self._app = app

    async def _agent(self, stream: Any) -> None:
        async for events in stream.take_events(self.batch_size, within=self.batch_seconds):
            # take_events acknowledges the batch when this body returns, so it must not return
            # (or raise) before the batch is written.
            await self.write([event.message for event in events])

    async def write(self, messages: Sequence[Any]) -> None:
        envelopes = []
        for message in messages:
            try:
                envelopes.append(decode(message.value))
            except EnvelopeError as exc:
                self.metrics.undecodable += 1
                log.warning("projector skips an undecodable run event at offset %s: %s", message.offset, exc)
        async with self._writing:
            await self._write(messages, envelopes)

    async def _write(self, messages: Sequence[Any], envelopes: list[Envelope]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            duplicates = self.projection.duplicates
            try:
                written = await loop.run_in_executor(self._io, self.projection.write, envelopes)
                break
            except asyncio.CancelledError:
                raise
            except Exception:
                self.metrics.write_errors += 1
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

    async def rebuild(self, history: Iterable[Envelope]) -> int:
        """Rebuild every projection from `history` and swap it in (projections/rebuild.py), with
        this projector's own connection and thread, while no batch is written; then go on from
        where it was, into the new tables, with the runs' states read from them afresh."""
        async with self._writing:
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(self._io, rebuild, self.projection.client, history)
            finally:
                self.projection.forget()

    def _update_highwaters(self) -> None:
        app = self._app
        if app is None:
            return
        try:
            consumer = app.consumer
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
