"""Kafka plumbing: topic names, client settings, and a Faust app whose consumers we can tune.

Faust 0.15 hard-codes a 1.5 s fetch wait for worker consumers. On the embedded broker a
waiting fetch is not answered when data arrives, so every hop would cost that wait; our
transport builds the consumer with the wait from settings and lets it change at run time
(short while busy, growing with a lull, long while idle).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from faust.transport.drivers import aiokafka as faust_aiokafka

from schemas.envelope import Envelope, encode
from streams.tracing import TRACEPARENT, traceparent

COMMANDS = "citadel.commands"
RUN_EVENTS = "citadel.run-events"
NODE_TASKS = "citadel.node-tasks"
DEAD_LETTERS = "citadel.dead-letters"
TOPICS = (COMMANDS, RUN_EVENTS, NODE_TASKS, DEAD_LETTERS)


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str
    partitions: int = 8
    # Prefixed to every topic name, so several engines (or test sessions) can share a cluster.
    namespace: str = ""
    # The embedded broker holds every JoinGroup for session_timeout/2: keep it short there.
    session_timeout: float = 6.0
    heartbeat_interval: float = 1.0
    fetch_wait_busy_ms: int = 2
    fetch_wait_idle_ms: int = 100
    # In a lull, a message may wait for the fetch in flight: at most this share of the lull.
    fetch_wait_lull_share: float = 0.05

    def topic(self, name: str) -> str:
        return f"{self.namespace}{name}"

    @classmethod
    def for_embedded(cls, bootstrap: str, partitions: int = 8, namespace: str = "") -> KafkaSettings:
        return cls(bootstrap=bootstrap, partitions=partitions, namespace=namespace)

    @classmethod
    def for_cluster(cls, bootstrap: str, partitions: int = 16, namespace: str = "") -> KafkaSettings:
        # A real broker answers a waiting fetch as soon as data arrives: waiting long costs nothing.
        return cls(
            bootstrap=bootstrap,
            partitions=partitions,
            namespace=namespace,
            session_timeout=30.0,
            heartbeat_interval=3.0,
            fetch_wait_busy_ms=500,
            fetch_wait_idle_ms=500,
        )


def fetch_wait_ms(settings: KafkaSettings, lull_seconds: float) -> int:
    """The fetch wait after `lull_seconds` without activity: the busy wait at first, then a
    share of the lull, up to the idle wait.

    Each empty fetch costs CPU here and in the embedded broker, taken from the nodes running
    beside them (a fib(33) node lost a quarter of its speed to 2 ms fetches). A wait in
    proportion to the lull makes a long lull cost a few dozen fetches, and delays the message
    that ends it by at most that share of it.
    """
    grown = lull_seconds * settings.fetch_wait_lull_share * 1000
    return round(min(settings.fetch_wait_idle_ms, max(settings.fetch_wait_busy_ms, grown)))


class FetchTuner:
    """Sets the fetch wait of our consumers from the time since the last activity."""

    TICK_SECONDS = 0.05

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self.consumers: list[Any] = []
        self._last_activity = -math.inf
        self._wait_ms = settings.fetch_wait_idle_ms

    def register(self, consumer: Any) -> None:
        consumer._fetch_max_wait_ms = self._wait_ms
        self.consumers.append(consumer)

    def activity(self) -> None:
        self._last_activity = time.monotonic()
        if self._wait_ms != self.settings.fetch_wait_busy_ms:
            self._set(self.settings.fetch_wait_busy_ms)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.TICK_SECONDS)
            wait_ms = fetch_wait_ms(self.settings, time.monotonic() - self._last_activity)
            if wait_ms != self._wait_ms:
                self._set(wait_ms)

    def _set(self, wait_ms: int) -> None:
        self._wait_ms = wait_ms
        for consumer in self.consumers:
            consumer._fetch_max_wait_ms = wait_ms
            fetcher = getattr(consumer, "_fetcher", None)
            if fetcher is not None:
                fetcher._fetch_max_wait_ms = wait_ms


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        app: StreamApp = self.app  # type: ignore[assignment]  # Faust types it as AppT
        app.fetch_tuner.register(consumer)
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> Any:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class StreamApp(faust.App):
    """A Faust app on our transport; `fetch_tuner` adjusts its consumers' fetch wait."""

    fetch_tuner: FetchTuner

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)

    def _new_producer_transport(self) -> Any:
        return _Transport(self.conf.broker_producer, self)


def stream_app(name: str, settings: KafkaSettings, datadir: str) -> StreamApp:
    app = StreamApp(
        name,
        broker=f"kafka://{settings.bootstrap}",
        web_enabled=False,
        autodiscover=False,
        datadir=datadir,
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        broker_session_timeout=settings.session_timeout,
        broker_heartbeat_interval=settings.heartbeat_interval,
        broker_request_timeout=max(40.0, settings.session_timeout * 2),
        consumer_auto_offset_reset="earliest",
        producer_linger_ms=0,
        stream_wait_empty=False,
        broker_commit_interval=0.5,
    )
    app.fetch_tuner = FetchTuner(settings)
    return app


def group_consumer(settings: KafkaSettings, group: str, *topics: str, **options: Any) -> AIOKafkaConsumer:
    """A consumer in `group`, from the earliest offset where the group has none, with the session
    timing the broker wants; it commits nothing by itself (its owner commits what is done)."""
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=round(settings.session_timeout * 1000),
        heartbeat_interval_ms=round(settings.heartbeat_interval * 1000),
        **options,
    )


async def broker_partitions(consumer: AIOKafkaConsumer, settings: KafkaSettings, topic: str) -> list[int]:
    """The partitions of one of the engine's topics as the broker has them (producers chose a
    message's partition among these), whatever count `settings` assume; those assumed while
    the broker does not know the topic yet. `consumer` is started."""
    await consumer.topics()  # fetches the cluster's metadata
    found = consumer.partitions_for_topic(settings.topic(topic))
    return sorted(found) if found else list(range(settings.partitions))


async def ensure_topics(settings: KafkaSettings, topics: tuple[str, ...] = TOPICS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        names = [settings.topic(t) for t in topics]
        missing = [NewTopic(t, settings.partitions, 1) for t in names if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()


async def send_command(producer: AIOKafkaProducer, settings: KafkaSettings, command: Envelope) -> None:
    """Publish a command to `citadel.commands`, keyed by its run and carrying the run's trace
    context, as the engine publishes its own; return once the broker has it."""
    headers = [(TRACEPARENT, traceparent(command.run_id))]
    topic = settings.topic(COMMANDS)
    await producer.send_and_wait(topic, encode(command), key=command.run_id.encode(), headers=headers)


def producer(settings: KafkaSettings) -> AIOKafkaProducer:
    # acks=all and no idempotence: the embedded broker fails InitProducerId; duplicates are
    # harmless because every consumer dedupes by command id or (run, version).
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap,
        acks="all",
        linger_ms=0,
        enable_idempotence=False,
        max_batch_size=256 * 1024,
    )
