"""Live run events for subscriptions: an in-process fan-out, and history then live with no gap.

The hub is fed with every run event once the broker has it: in the engine's own process by
the outbox itself (`Engine.published_listeners`, no hop) while this process publishes, and by
`KafkaTail`, one consumer of `citadel.run-events` from its end, where another process may
publish (several workers, or a gateway without an engine). The hub passes each (run, version)
on once, whichever source brings it first. It also hears of rejected commands (the engine's
dead letters), so a caller waiting for a run to start learns at once that it never will.

A subscription subscribes to the hub first
and buffers, then reads the event store, then goes on with the buffer, skipping what it has
already sent: every event committed after the read is in the buffer, every one before it in
the read, so nothing is missed and nothing is sent twice (by (run, version)).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.envelope import Envelope, EnvelopeError, decode
from streams.kafka import DEAD_LETTERS, RUN_EVENTS, KafkaSettings, broker_partitions
from streams.watch import rejected_command

log = logging.getLogger(__name__)
TERMINAL = frozenset({"Completed", "Failed", "Cancelled"})
Positioned = tuple[int | None, Envelope]


class SubscriberFellBehind(Exception):
    """A subscriber's buffer overflowed; it must resubscribe from the last version it has."""


class Subscriber:
    def __init__(self, wanted: Callable[[Envelope], bool], capacity: int) -> None:
        self.wanted = wanted
        self.queue: asyncio.Queue[Positioned] = asyncio.Queue(capacity)
        self.overflowed = False

    async def get(self) -> Positioned:
        if self.overflowed and self.queue.empty():
            raise SubscriberFellBehind("this subscription fell behind the live events; resubscribe")
        return await self.queue.get()


class RunEventHub:
    """Fan-out of published run events to every in-process subscriber whose filter wants them."""

    def __init__(self, capacity: int = 10_000, remembered: int = 100_000) -> None:
        self.capacity = capacity
        self.subscribers: set[Subscriber] = set()
        self.listeners: list[Callable[[list[Positioned]], None]] = []  # called in line (metrics)
        self._seen: OrderedDict[tuple[str, int | None], None] = OrderedDict()
        self._remembered = remembered
        self._rejections: dict[str, asyncio.Future[str]] = {}

    def publish(self, batch: list[tuple[int, Envelope]] | list[Positioned]) -> None:
        items: list[Positioned] = [item for item in batch if self._first_time(item[1])]
        if not items:
            return
        for listener in self.listeners:
            listener(items)
        for subscriber in list(self.subscribers):
            for item in items:
                if subscriber.overflowed or not subscriber.wanted(item[1]):
                    continue
                try:
                    subscriber.queue.put_nowait(item)
                except asyncio.QueueFull:
                    subscriber.overflowed = True

    def _first_time(self, event: Envelope) -> bool:
        key = (event.run_id, event.version)
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self._remembered:
            self._seen.popitem(last=False)
        return True

    def reject(self, command_id: str, reason: str) -> None:
        """The engine rejected a command: tell whoever waits for it."""
        waiting = self._rejections.get(command_id)
        if waiting is not None and not waiting.done():
            waiting.set_result(reason)

    @contextlib.contextmanager
    def rejection(self, command_id: str) -> Iterator[asyncio.Future[str]]:
        """A future that gets the reason if the engine rejects the command, while the block runs."""
        waiting: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._rejections[command_id] = waiting
        try:
            yield waiting
        finally:
            del self._rejections[command_id]
            waiting.cancel()

    @contextlib.contextmanager
    def subscribe(self, wanted: Callable[[Envelope], bool]) -> Iterator[Subscriber]:
        subscriber = Subscriber(wanted, self.capacity)
        self.subscribers.add(subscriber)
        try:
            yield subscriber
        finally:
            self.subscribers.discard(subscriber)


ReadRun = Callable[[int], Awaitable[tuple[list[Envelope], bool]]]


async def follow_run(
    hub: RunEventHub, run_id: str, from_version: int, read: ReadRun
) -> AsyncIterator[Envelope]:
    """One run's events from `from_version` on, history then live, each once, until it ends.

    `read(after)` gives the stored events after version `after` and whether the run has ended.
    """
    with hub.subscribe(lambda event: event.run_id == run_id) as live:
        last = max(0, from_version - 1)
        while True:
            events, ended = await read(last)
            for event in events:
                assert event.version is not None
                last = event.version
                yield event
            if ended:
                return
            # Live: what the store read already covered is skipped; a gap (a hub that dropped
            # something) sends us back to the store.
            while True:
                _, event = await live.get()
                version = event.version or 0
                if version <= last:
                    continue
                if version > last + 1:
                    break
                last = version
                yield event
                if event.type in TERMINAL:
                    return


ReadPage = Callable[[int], Awaitable[tuple[list[tuple[int, Envelope]], int]]]


async def follow_runs(
    hub: RunEventHub, wanted: Callable[[Envelope], bool], from_position: int | None, read: ReadPage
) -> AsyncIterator[Positioned]:
    """Every wanted run event: from store position `from_position` on when given (history, then
    live), else live from now; once each by (run, version)."""
    with hub.subscribe(wanted) as live:
        last: OrderedDict[str, int] = OrderedDict()  # run id -> last version sent

        def fresh(event: Envelope) -> bool:
            version = event.version or 0
            if version <= last.get(event.run_id, 0):
                return False
            last[event.run_id] = version
            last.move_to_end(event.run_id)
            if len(last) > 100_000:
                last.popitem(last=False)
            return True

        if from_position is not None:
            position = max(1, from_position)
            while True:
                page, following = await read(position)
                for item in page:
                    if fresh(item[1]):
                        yield item
                if following == position:
                    break
                position = following
        while True:
            positioned = await live.get()
            if fresh(positioned[1]):
                yield positioned


class KafkaTail:
    """Feeds the hub from `citadel.run-events`, and its rejections from `citadel.dead-letters`.

    One consumer in no group, on every partition from the end at start: what was committed
    before is read from the event store by each subscription."""

    def __init__(self, kafka: KafkaSettings, hub: RunEventHub) -> None:
        self.kafka = kafka
        self.hub = hub
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=self.kafka.fetch_wait_busy_ms,
        )
        await consumer.start()
        try:
            partitions = [
                TopicPartition(self.kafka.topic(topic), p)
                for topic in (RUN_EVENTS, DEAD_LETTERS)
                for p in await broker_partitions(consumer, self.kafka, topic)
            ]
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(consumer))

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        run_events, dead_letters = self.kafka.topic(RUN_EVENTS), self.kafka.topic(DEAD_LETTERS)
        while True:
            batches: dict[Any, Any] = await consumer.getmany(timeout_ms=500, max_records=1000)
            events: list[Positioned] = []
            for partition, messages in batches.items():
                for message in messages:
                    if partition.topic == run_events:
                        try:
                            events.append((None, decode(message.value)))
                        except EnvelopeError:
                            continue
                    elif partition.topic == dead_letters and (rejected := rejected_command(message.value)):
                        self.hub.reject(*rejected)
            if events:
                self.hub.publish(events)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()
