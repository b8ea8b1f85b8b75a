"""The engine: the Faust agents of the Flow (decide, publish, dispatch/execute), timers, reconcile.

decide   citadel.commands -> RunStore.decide (a batch per save, in the store thread)
publish  the store's notification log -> citadel.run-events, node tasks, timers: an outbox
execute  citadel.node-tasks -> an executor -> the result as a command

Two shortcuts keep a run's critical path off the broker when one worker holds both ends: a
task for a run whose node-tasks partition this worker consumes starts on its executors at
once, and a result for a run it decides goes straight to decide. The published copies still
travel, for durability, and are recognised as duplicates.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from eventsourcing.persistence import Notification
from opentelemetry.trace import SpanContext
from pydantic import ValidationError

from aggregates.ledger import Ledger, open_ledger
from aggregates.run import ACTIVE_RUN, Run, run_uuid
from aggregates.store import REJECTED, RunStore
from nodes.base import ExecutorRegistry
from nodes.secrets import EnvironmentSecrets, SecretStore
from schemas.envelope import Envelope, EnvelopeError, decode, encode
from schemas.tasks import NodeOutcome, NodeTask
from streams.admission import Admission, Attempt, Limits
from streams.clock import Clock, SystemClock
from streams.kafka import (
    COMMANDS,
    DEAD_LETTERS,
    NODE_TASKS,
    RUN_EVENTS,
    KafkaSettings,
    StreamApp,
    ensure_topics,
    producer,
    stream_app,
)
from streams.notify import Notifier
from streams.scheduler import Scheduler
from streams.timers import Timers
from streams.tracing import (
    TRACEPARENT,
    attempt_failed,
    attempt_span,
    parse_traceparent,
    record_run_span,
    traceparent,
)
from streams.triggers import Triggers

log = logging.getLogger(__name__)
T = TypeVar("T")

OUTBOX = "run-events"
RUN_TOPIC = "aggregates.run:"  # the store's topics of Run events
TERMINAL_EVENTS = {"Completed": "completed", "Failed": "failed", "Cancelled": "cancelled"}
TIMER_EVENTS = frozenset({"RetryScheduled", "WaitScheduled", "ApprovalRequested"})
_EVENT_META = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic"})


@dataclass(frozen=True)
class EngineSettings:
    kafka: KafkaSettings
    store_url: str
    datadir: str
    group: str = "citadel"
    snapshot_interval: int = 100
    decide_batch: int = 512
    decide_queue: int = 4096
    outbox_batch: int = 1000
    outbox_poll_seconds: float = 0.05
    executor_concurrency: int = 8
    start_report_seconds: float = 0.1
    reconcile: bool = True
    trigger_poll_seconds: float = 1.0  # how often deployments are read for new triggers
    trigger_batch: int = 500  # trigger messages taken at a time, committed together
    schedules: bool = True  # fire the schedules of deployed workflows (see streams/scheduler.py)
    egress_private: bool = True  # outgoing webhooks may reach private addresses (nodes/egress.py)
    # Attempts in flight per tenant, workflow and node type (engine-wide); none by default here.
    admission: Limits = field(default_factory=Limits)


def event_envelope(domain_event: Any, tenant: str) -> Envelope:
    """The wire form of a committed run event; its id (run:version) is stable across republishing."""
    run_id = str(domain_event.originator_id)
    version = int(domain_event.originator_version)
    return Envelope(
        id=f"{run_id}:{version}",
        type=type(domain_event).__name__,
        run_id=run_id,
        tenant=tenant,
        time=domain_event.timestamp,
        version=version,
        payload=event_payload(domain_event),
    )


def event_payload(domain_event: Any) -> dict[str, Any]:
    return {k: v for k, v in domain_event.__dict__.items() if k not in _EVENT_META}


def task_from_event(run_id: str, tenant: str, workflow: str, payload: dict[str, Any]) -> NodeTask:
    return NodeTask(
        run_id=run_id,
        tenant=tenant,
        workflow=workflow,
        node_id=payload["node_id"],
        node_type=payload["node_type"],
        attempt=payload["attempt"],
        attempt_id=payload["attempt_id"],
        config=payload["config"],
        inputs=payload["inputs"],
        timeout_seconds=payload["timeout_seconds"],
    )


def result_command(task: NodeTask, outcome: NodeOutcome) -> Envelope:
    common = {
        "node_id": task.node_id,
        "attempt_id": task.attempt_id,
        "duration_ms": outcome.duration_ms,
        "stdout": outcome.stdout,
        "stderr": outcome.stderr,
    }
    if outcome.ok:
        kind, payload = "NodeSucceeded", {**common, "output": outcome.output}
    else:
        kind, payload = (
            "NodeFailed",
            {**common, "error_class": outcome.error_class or "Error", "message": outcome.error_message or ""},
        )
    return Envelope.new(kind, task.run_id, payload, id=f"{task.attempt_id}:result", tenant=task.tenant)


class RunIdentity(NamedTuple):
    """What the outbox needs to know of a run besides its events."""

    tenant: str
    workflow: str
    parent: dict[str, Any] | None  # the subworkflow node a child run reports to
    started: dt.datetime  # its first event's time: where its trace's root span begins


def child_result(
    parent: dict[str, Any], tenant: str, child_run_id: str, status: str, outputs: Any, reason: str | None
) -> Envelope:
    """A finished child run's outcome, as the result of its parent's subworkflow attempt."""
    common = {"node_id": parent["node_id"], "attempt_id": parent["attempt_id"]}
    if status == "completed":
        kind, payload = "NodeSucceeded", {**common, "output": outputs}
    else:
        error_class = "ChildRunFailed" if status == "failed" else "ChildRunCancelled"
        message = f"child run {child_run_id} {status}: {reason}"
        kind, payload = "NodeFailed", {**common, "error_class": error_class, "message": message}
    return Envelope.new(kind, parent["run_id"], payload, id=f"{parent['attempt_id']}:result", tenant=tenant)


class Engine:
    def __init__(
        self,
        settings: EngineSettings,
        executors: ExecutorRegistry,
        clock: Clock | None = None,
        secrets: SecretStore | None = None,
    ) -> None:
        self.settings = settings
        self.executors = executors
        self.clock = clock or SystemClock()
        self.secrets = secrets or EnvironmentSecrets()  # signs outgoing webhooks
        self.notifier: Notifier | None = None
        self.store: RunStore | None = None
        self.ledger: Ledger | None = None
        self.producer: AIOKafkaProducer | None = None
        self.app: StreamApp = self._build_app()
        self.timers = Timers(self.clock, self._fire_timer)
        self.triggers = Triggers(self)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="citadel-store")
        self._decide_queue: asyncio.Queue[tuple[Any, Any]] = asyncio.Queue(settings.decide_queue)
        self._outbox_wake = asyncio.Event()
        self._runs: OrderedDict[str, RunIdentity] = OrderedDict()
        self._log_attempts: set[str] = set()
        self._partitioner = DefaultPartitioner()
        self._handoff: deque[tuple[int, str, Any]] = deque(maxlen=100_000)
        self._poll_store = True
        self._local_tasks: asyncio.Queue[tuple[NodeTask, asyncio.Future[None]]] = asyncio.Queue(
            2 * settings.executor_concurrency
        )
        self._local_attempts: OrderedDict[str, asyncio.Future[None]] = OrderedDict()
        self._tasks: list[asyncio.Task[Any]] = []
        # In-process listeners of committed run events, as (position, event) batches: the gateway's
        # live subscriptions, without a hop through the broker. An event this worker decided is
        # shown as soon as it is saved and again when the outbox publishes it: listeners take
        # each (run, version) once.
        self.published_listeners: list[Callable[[list[tuple[int, Envelope]]], None]] = []
        self.rejected_listeners: list[Callable[[str, str], None]] = []  # (command id, reason)
        self.publishing = False  # whether this worker's outbox leads (one per store)
        self.admission = Admission(settings.admission)
        self._released: list[Attempt] = []  # admitted in place of ended ones, to dispatch

    # ---- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        self.store = await self._in_store(RunStore, settings.store_url, settings.snapshot_interval)
        self.ledger = await self._in_store(open_ledger, settings.store_url)
        scheduler = Scheduler(self.store, self._in_store, self._submit_here, self.clock)
        self.notifier = Notifier(
            self.store,
            self._in_store,
            self._submit_here,
            self.clock,
            self.secrets,
            allow_private=self.settings.egress_private,
        )
        await ensure_topics(settings.kafka)
        self.producer = producer(settings.kafka)
        await self.producer.start()
        await self.executors.start()
        for coroutine in (
            self._decide_loop(),
            self._outbox_loop(),
            self.timers.run(),
            self.triggers.run(),
            self.notifier.run(),
            self.app.fetch_tuner.run(),
            *(self._local_executor() for _ in range(settings.executor_concurrency)),
            *([scheduler.run()] if settings.schedules else []),
        ):
            self._tasks.append(asyncio.create_task(coroutine))
        await self.app.start()
        await self._wait_for_assignment()
        log.info("engine started: broker %s, store %s", settings.kafka.bootstrap, settings.store_url)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        try:
            await self.app.stop()
        except Exception:  # a half-started Faust app may fail to stop; nothing is lost by it
            log.debug("faust app stop failed", exc_info=True)
        await self.executors.stop()
        if self.producer is not None:
            await self.producer.stop()
        if self.ledger is not None:
            await self._in_store(self.ledger.close)
        if self.store is not None:
            await self._in_store(self.store.close)
        self._io.shutdown(wait=True)

    async def _wait_for_assignment(self, timeout: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.app.consumer.assignment():
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError("the engine's consumers got no partitions from the broker")
            await asyncio.sleep(0.05)

    async def _in_store(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, function, *args)

    # ---- commands in -----------------------------------------------------

    async def submit(self, *commands: Envelope) -> None:
        """Publish commands and wait until the broker has every one."""
        deliveries = [await self._send(self._topic(COMMANDS), c.run_id, encode(c)) for c in commands]
        await asyncio.gather(*deliveries)

    async def _submit_here(self, command: Envelope) -> None:
        """Submit a command this worker made (a scheduled start, a delivery's outcome), deciding
        it here at once if this worker decides its run."""
        await (await self._report(command))

    def _topic(self, name: str) -> str:
        return self.settings.kafka.topic(name)

    async def _send(self, topic: str, key: str, value: bytes) -> asyncio.Future[Any]:
        assert self.producer is not None
        self.app.fetch_tuner.activity()
        future: asyncio.Future[Any] = await self.producer.send(
            topic, value, key=key.encode(), headers=[(TRACEPARENT, traceparent(key))]
        )
        return future

    async def dead_letter(self, source: str, message: Any, reason: str) -> None:
        value = message.value if isinstance(message.value, bytes) else b""
        record = {
            "reason": reason,
            "topic": source,
            "partition": getattr(message, "partition", None),
            "offset": getattr(message, "offset", None),
            "key": (message.key or b"").decode("utf-8", "replace"),
            "value": value.decode("utf-8", "replace") if _is_text(value) else None,
            "value_base64": None if _is_text(value) else base64.b64encode(value).decode(),
            "time": self.clock.now().isoformat(),
        }
        log.warning("dead letter from %s: %s", source, reason)
        await (
            await self._send(
                self._topic(DEAD_LETTERS),
                (message.key or b"").decode("utf-8", "replace"),
                orjson.dumps(record),
            )
        )

    # ---- decide ----------------------------------------------------------

    def _build_app(self) -> StreamApp:
        settings = self.settings
        app = stream_app(settings.group, settings.kafka, settings.datadir)
        commands = app.topic(
            settings.kafka.topic(COMMANDS),
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.kafka.partitions,
        )
        tasks = app.topic(
            settings.kafka.topic(NODE_TASKS),
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.kafka.partitions,
        )
        # Fetched tasks waiting for an executor: when they fill this, the consumer stops fetching
        # (the lag stays in Kafka) instead of buffering Faust's default of thousands in memory.
        # Set on the topic itself: Faust 0.15's app.topic() drops its maxsize argument.
        tasks.maxsize = 2 * settings.executor_concurrency
        app.agent(commands, name="decide")(self._decide_agent)
        app.agent(tasks, name="execute", concurrency=settings.executor_concurrency)(self._execute_agent)
        return app

    async def _decide_agent(self, stream: Any) -> None:
        # One ordered queue per process keeps each partition's order; the bounded queue is
        # the backpressure: when decide falls behind, the agent stops pulling.
        manual = stream.noack()
        async for event in manual.events():
            await self._decide_queue.put((manual, event))

    async def _decide_loop(self) -> None:
        queue = self._decide_queue
        while True:
            batch = [await queue.get()]
            while len(batch) < self.settings.decide_batch and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self._decide_batch(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The store is unreachable or broken: nothing was acked, so the commands are
                # redelivered after a restart; keep the loop alive and retry this batch.
                log.exception("deciding a batch of %d commands failed; retrying", len(batch))
                await asyncio.sleep(1.0)
                for item in reversed(batch):
                    queue._queue.appendleft(item)  # type: ignore[attr-defined]

    async def _decide_batch(self, batch: list[tuple[Any, Any]]) -> None:
        assert self.store is not None
        self.app.fetch_tuner.activity()
        commands: list[Envelope] = []
        for stream, event in batch:
            if stream is None:
                commands.append(event)  # handed over in-process by this worker's executor
                continue
            try:
                commands.append(decode(event.message.value))
            except EnvelopeError as exc:
                await self.dead_letter(COMMANDS, event.message, f"undecodable command: {exc}")
        if commands:
            verdicts = await self._in_store(self.store.decide, commands, self.clock.now())
            self._handoff.extend(
                (r.notification.id, r.notification.topic, r.domain_event) for r in verdicts.recordings
            )
            self._outbox_wake.set()
            if self.published_listeners:
                self._show_saved(verdicts.recordings)
            for verdict in verdicts:
                if verdict.outcome == REJECTED:
                    await self._rejected(verdict.command, verdict.reason)
        for stream, event in batch:
            if stream is not None:
                await stream.ack(event)

    def _show_saved(self, recordings: list[Any]) -> None:
        """Just-saved run events to the listeners, without waiting for the outbox, which may be
        waiting for the broker to acknowledge its last batch. A run whose tenant is not known
        yet (its `Started` is not published) waits for the outbox."""
        shown: list[tuple[int, Envelope]] = []
        for recording in recordings:
            if not recording.notification.topic.startswith(RUN_TOPIC):
                continue
            domain_event = recording.domain_event
            identity = self._runs.get(str(domain_event.originator_id))
            if identity is not None:
                tenant = identity.tenant
            elif type(domain_event).__name__ == "Started":
                tenant = domain_event.tenant
            else:
                continue
            if isinstance(tenant, str):
                shown.append((recording.notification.id, event_envelope(domain_event, tenant)))
        if shown:
            for listener in self.published_listeners:
                listener(shown)

    async def _rejected(self, command: Envelope, reason: str) -> None:
        await self.dead_letter(COMMANDS, _Raw(command), reason)
        for listener in self.rejected_listeners:
            listener(command.id, reason)
        parent = command.payload.get("parent") if command.type == "StartRun" else None
        if isinstance(parent, dict):
            # A child that cannot start (workflow not deployed, bad input) fails its parent's node,
            # which would otherwise wait for it for ever. Sent before the command is acked.
            failure = Envelope.new(
                "NodeFailed",
                parent["run_id"],
                {
                    "node_id": parent["node_id"],
                    "attempt_id": parent["attempt_id"],
                    "error_class": "ChildRunRejected",
                    "message": reason,
                },
                id=f"{parent['attempt_id']}:result",
                tenant=command.tenant,
            )
            await self.submit(failure)

    # ---- publish (outbox) ------------------------------------------------

    async def _outbox_loop(self) -> None:
        assert self.ledger is not None
        # One publisher per store: workers sharing a store wait here and take over when the
        # leader goes, reconciling first as any restarted engine does.
        while not await self._in_store(self.ledger.try_lead):
            self._handoff.clear()
            await asyncio.sleep(1.0)
        self.publishing = True
        log.info("this worker publishes the run events of %s", self.settings.store_url)
        if self.settings.reconcile:
            await self.reconcile()
        position = await self._in_store(self.ledger.position, OUTBOX)
        ledger = _LedgerWriter(position)
        try:
            while True:
                try:
                    position = await self._publish_from(position, ledger)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("publishing run events failed; retrying from position %d", position)
                    await asyncio.sleep(1.0)
        finally:
            self.publishing = False
            # A clean stop hands over exactly where it got to (a crash republishes a little).
            if ledger.pending:
                await self._in_store(ledger.flush, self.ledger)

    async def _publish_from(self, position: int, ledger: _LedgerWriter) -> int:
        """Publish what was committed after `position`; return the new position."""
        assert self.store is not None and self.ledger is not None
        batch = self._take_handoff(position)
        if not batch and (self._handoff or self._poll_store):
            # A gap (events another process recorded), a start, or a quiet interval: read the
            # store itself. Otherwise everything recorded here came through the handoff.
            self._poll_store = False
            notifications = await self._in_store(
                self.store.recorder.select_notifications, position + 1, self.settings.outbox_batch
            )
            batch = [(n.id, n.topic, n) for n in notifications]
        if not batch:
            if ledger.pending and ledger.due():
                await self._in_store(ledger.flush, self.ledger)
            self._outbox_wake.clear()
            try:
                # Not wait_for: on Python 3.11 it swallows a cancellation that lands as the wake
                # comes, and stop() would then wait for this loop forever.
                async with asyncio.timeout(self.settings.outbox_poll_seconds):
                    await self._outbox_wake.wait()
            except TimeoutError:
                self._poll_store = True
                if ledger.pending:
                    await self._in_store(ledger.flush, self.ledger)
            return position
        deliveries = []
        published: list[tuple[int, Envelope]] = []
        for position_of_event, topic, item in batch:
            if not topic.startswith(RUN_TOPIC):
                continue
            domain_event = (
                item if not isinstance(item, Notification) else self.store.mapper.to_domain_event(item)
            )
            run_id = str(domain_event.originator_id)
            identity = await self._run_identity(run_id, domain_event)
            envelope = event_envelope(domain_event, identity.tenant)
            deliveries.append(await self._send(self._topic(RUN_EVENTS), run_id, encode(envelope)))
            published.append((int(position_of_event), envelope))
            deliveries.extend(await self._follow_up(envelope, identity))
            self._end_attempts(envelope)
            if envelope.type == "Started" or envelope.type == "NotificationsScheduled":
                ledger.mark(run_id, active=True)  # deliveries pending: reconcile re-arms them
            elif envelope.type in TERMINAL_EVENTS:
                ledger.mark(run_id, active=False)
                self._runs.pop(run_id, None)
                attributes = {"citadel.tenant": identity.tenant, "citadel.workflow": identity.workflow}
                record_run_span(
                    run_id, attributes, identity.started, envelope.time, TERMINAL_EVENTS[envelope.type]
                )
            elif envelope.type == "NotificationAttempted" and envelope.payload["outstanding"] == 0:
                ledger.mark(run_id, active=False)
        for listener in self.published_listeners:
            listener(published)  # committed, so safe to show before the broker acknowledges
        deliveries.extend(await self._dispatch_released())
        await asyncio.gather(*deliveries)
        self._released.clear()
        ledger.position = int(batch[-1][0])
        if ledger.due():
            await self._in_store(ledger.flush, self.ledger)
        return ledger.position

    def _take_handoff(self, position: int) -> list[tuple[int, str, Any]]:
        """Events this process just recorded, if they follow `position` without a gap.

        Reading them back from the store would cost a query and a decode per batch; a gap
        (another writer, or a restart) falls back to reading the store.
        """
        handoff = self._handoff
        while handoff and handoff[0][0] <= position:
            handoff.popleft()
        if not handoff or handoff[0][0] != position + 1:
            return []
        batch: list[tuple[int, str, Any]] = []
        expected = position + 1
        while handoff and handoff[0][0] == expected and len(batch) < self.settings.outbox_batch:
            batch.append(handoff.popleft())
            expected += 1
        return batch

    async def _follow_up(self, envelope: Envelope, identity: RunIdentity) -> list[asyncio.Future[Any]]:
        """What a committed event sets in motion: a node task, a timer, a log line, a child run."""
        payload = envelope.payload
        workflow = identity.workflow
        if envelope.type in RUN_COMMANDS:
            command = RUN_COMMANDS[envelope.type](envelope)
            return [await self._send(self._topic(COMMANDS), command.run_id, encode(command))]
        if envelope.type in TERMINAL_EVENTS and identity.parent is not None:
            command = child_result(
                identity.parent,
                envelope.tenant,
                envelope.run_id,
                TERMINAL_EVENTS[envelope.type],
                payload.get("outputs"),
                payload.get("reason"),
            )
            return [await self._send(self._topic(COMMANDS), command.run_id, encode(command))]
        if envelope.type == "NodeScheduled":
            if not payload["inline"]:
                return await self._admit(envelope, workflow)
            if payload["node_type"] == "log":
                self._log_attempts.add(payload["attempt_id"])
        elif envelope.type == "NotificationsScheduled":
            assert self.notifier is not None
            for delivery_id, delivery in payload["deliveries"].items():
                self.notifier.arm(
                    envelope.run_id, envelope.tenant, delivery_id, delivery["attempt"], delivery["due_at"]
                )
        elif envelope.type == "NotificationAttempted" and payload["next_attempt_at"] is not None:
            assert self.notifier is not None
            self.notifier.arm(
                envelope.run_id,
                envelope.tenant,
                payload["delivery_id"],
                payload["attempt"] + 1,
                payload["next_attempt_at"],
            )
        elif envelope.type in TIMER_EVENTS and payload.get("timer_id") and payload.get("due_at"):
            self.timers.arm(
                payload["timer_id"],
                envelope.run_id,
                envelope.tenant,
                dt.datetime.fromisoformat(payload["due_at"]),
            )
        elif envelope.type == "NodeSucceeded" and payload["attempt_id"] in self._log_attempts:
            self._log_attempts.discard(payload["attempt_id"])
            output = payload.get("output") or {}
            level = logging.getLevelName(str(output.get("level", "info")).upper())
            logging.getLogger("citadel.run").log(
                level if isinstance(level, int) else logging.INFO,
                "[%s %s] %s",
                workflow,
                payload["node_id"],
                output.get("message"),
                extra={"run_id": envelope.run_id, "node_id": payload["node_id"]},
            )
        return []

    async def _admit(self, scheduled: Envelope, workflow: str) -> list[asyncio.Future[Any]]:
        """Dispatch a scheduled attempt if admission lets it go now; else it waits (in the store)."""
        payload = scheduled.payload
        assert scheduled.version is not None  # every committed event has one
        attempt = Attempt(
            run_id=scheduled.run_id,
            attempt_id=payload["attempt_id"],
            tenant=scheduled.tenant,
            workflow=workflow,
            node_type=payload["node_type"],
            version=scheduled.version,
        )
        if not self.admission.offer(attempt):
            return []
        return [await self._dispatch(task_from_event(scheduled.run_id, scheduled.tenant, workflow, payload))]

    def _end_attempts(self, envelope: Envelope) -> None:
        """A result, or the end of a run, frees admission slots: collect who takes them."""
        if envelope.type in ("NodeSucceeded", "NodeFailed"):
            self._released.extend(self.admission.end(envelope.run_id, envelope.payload["attempt_id"]))
        elif envelope.type in TERMINAL_EVENTS:
            self._released.extend(self.admission.end_run(envelope.run_id))

    async def _dispatch_released(self) -> list[asyncio.Future[Any]]:
        """Dispatch the attempts admitted in place of ended ones, their tasks loaded from their
        NodeScheduled events. The caller clears `_released` once the deliveries are done: a batch
        that fails is published again, and its released attempts dispatched again."""
        if not self._released:
            return []
        assert self.store is not None
        released = list(self._released)
        payloads = await self._in_store(_scheduled_payloads, self.store, released)
        return [
            await self._dispatch(task_from_event(a.run_id, a.tenant, a.workflow, payload))
            for a, payload in zip(released, payloads, strict=True)
        ]

    async def _run_identity(self, run_id: str, domain_event: Any) -> RunIdentity:
        if type(domain_event).__name__ == "Started":
            identity = RunIdentity(
                domain_event.tenant,
                domain_event.workflow,
                getattr(domain_event, "parent", None),
                domain_event.timestamp,
            )
        elif run_id in self._runs:
            return self._runs[run_id]
        else:
            assert self.store is not None
            run = await self._in_store(self.store.run, run_id)
            identity = RunIdentity(run.tenant, run.workflow, run.parent, run.created_on)
        self._runs[run_id] = identity
        while len(self._runs) > 100_000:
            self._runs.popitem(last=False)
        return identity

    # ---- timers ----------------------------------------------------------

    async def _fire_timer(self, timer_id: str, run_id: str, tenant: str) -> None:
        command = Envelope.new(
            "TimerFired",
            run_id,
            {"timer_id": timer_id},
            id=f"{timer_id}:fired",
            tenant=tenant,
            time=self.clock.now(),
        )
        await self.submit(command)

    # ---- execute ---------------------------------------------------------

    async def _dispatch(self, task: NodeTask) -> asyncio.Future[Any]:
        """Hand a task to the executors: here at once if possible, and always through the broker."""
        self._dispatch_here(task)
        return await self._send(self._topic(NODE_TASKS), task.run_id, task.model_dump_json().encode())

    def _dispatch_here(self, task: NodeTask) -> None:
        """Start a task on this worker's executors at once, without waiting for the broker.

        Only for runs whose node-tasks partition this worker consumes, so the published copy
        comes back here and is skipped; when the local queue is full the published copy does
        the work instead, and Kafka's lag is the backpressure.
        """
        if not self._consumes(NODE_TASKS, task.run_id) or self._local_tasks.full():
            return
        done = asyncio.get_running_loop().create_future()
        self._local_attempts[task.attempt_id] = done
        while len(self._local_attempts) > 100_000:  # copies that never came back (rebalance)
            self._local_attempts.popitem(last=False)
        self._local_tasks.put_nowait((task, done))

    async def _local_executor(self) -> None:
        while True:
            task, done = await self._local_tasks.get()
            try:
                await self._execute(task)
            finally:
                done.set_result(None)

    async def _execute_agent(self, stream: Any) -> None:
        async for event in stream.events():
            try:
                task = NodeTask.model_validate_json(event.message.value or b"")
            except ValidationError as exc:
                await self.dead_letter(NODE_TASKS, event.message, f"undecodable node task: {exc}")
                continue
            local = self._local_attempts.pop(task.attempt_id, None)
            if local is not None:
                # Started here already: ack the copy only once that run has reported its result.
                await asyncio.shield(local)
                continue
            await self._execute(task, parse_traceparent(dict(event.message.headers or {}).get(TRACEPARENT)))

    async def _execute(self, task: NodeTask, carried: SpanContext | None = None) -> None:
        with attempt_span(task, carried):  # one span per attempt, in its run's trace
            await self._attempt(task)

    async def _attempt(self, task: NodeTask) -> None:
        # A quick attempt's start is implied by its result (one decision instead of two); one
        # still running after start_report_seconds is reported as started, for live views.
        started = Envelope.new(
            "AttemptStarted",
            task.run_id,
            {"node_id": task.node_id, "attempt_id": task.attempt_id},
            id=f"{task.attempt_id}:started",
            tenant=task.tenant,
        )
        execution = asyncio.ensure_future(self.executors.execute(task))
        done, _ = await asyncio.wait({execution}, timeout=self.settings.start_report_seconds)
        if not done:
            await self._report(started)
        # What cannot be recorded fails the attempt here: encoding it later would fail for good.
        outcome = (await execution).recordable(task.node_id)
        if outcome.error_class is not None:
            log.info("attempt %d failed: %s: %s", task.attempt, outcome.error_class, outcome.error_message)
            attempt_failed(outcome.error_class)
        # Awaiting delivery before the task is acked: a result is never lost, at worst repeated.
        await (await self._report(result_command(task, outcome)))

    async def _report(self, command: Envelope) -> asyncio.Future[Any]:
        """Publish an executor's command; if this worker decides the run, also hand it to decide.

        The in-process copy saves a round trip through the broker on every node; the published
        copy keeps it durable and arrives later as a duplicate (same command id), which decide
        recognises and skips.
        """
        delivery = await self._send(self._topic(COMMANDS), command.run_id, encode(command))
        if self._consumes(COMMANDS, command.run_id):
            await self._decide_queue.put((None, command))
        return delivery

    def _consumes(self, topic: str, run_id: str) -> bool:
        """Whether this worker consumes the run's partition of `topic` (commands: decides it)."""
        partitions = list(range(self.settings.kafka.partitions))
        partition = self._partitioner(run_id.encode(), partitions, partitions)
        return TopicPartition(self._topic(topic), partition) in self.app.consumer.assignment()

    # ---- reconcile -------------------------------------------------------

    async def reconcile(self) -> None:
        """Offer unfinished attempts to admission again and re-arm timers and notification
        deliveries of every active run (after any restart): what fits is dispatched, the rest
        waits as before the restart."""
        assert self.ledger is not None and self.store is not None and self.notifier is not None
        active = await self._in_store(self.ledger.active_runs)
        runs: list[Run] = await self._in_store(_load_runs, self.store, active)
        attempts = await self._in_store(_unfinished_attempts, self.store, runs)
        self._released.extend(a for a in attempts if self.admission.offer(a))
        deliveries = await self._dispatch_released()
        for run in runs:
            self.notifier.arm_pending(run)
            for timer_id, timer in run.timers.items():
                self.timers.arm(timer_id, run.run_id, run.tenant, dt.datetime.fromisoformat(timer["due_at"]))
            for request in run.waiting_children():
                # The child's start, or its result, may have been lost with an embedded broker.
                command = await self._in_store(_child_progress, self.store, run, request)
                deliveries.append(await self._send(self._topic(COMMANDS), command.run_id, encode(command)))
        await asyncio.gather(*deliveries)
        self._released.clear()
        if runs:
            log.info(
                "reconciled %d active run(s): %d attempt(s) dispatched again, %d waiting, %d timer(s)",
                len(runs),
                len(deliveries),
                self.admission.parked,
                len(self.timers),
            )


def start_child(run_id: str, tenant: str, request: dict[str, Any]) -> Envelope:
    """The StartRun of the child a subworkflow attempt asked for (a ChildRunRequested payload)."""
    parent = {"run_id": run_id, "node_id": request["node_id"], "attempt_id": request["attempt_id"]}
    return Envelope.new(
        "StartRun",
        request["child_run_id"],
        {
            "workflow": request["workflow"],
            "workflow_version": request["version"],
            "input": request["input"],
            "parent": parent,
        },
        id=f"{request['attempt_id']}:child",
        tenant=tenant,
    )


def _cancel_child(envelope: Envelope) -> Envelope:
    payload = envelope.payload
    return Envelope.new(
        "CancelRun",
        payload["child_run_id"],
        {"reason": f"parent run {envelope.run_id} ended: {payload['reason']}"},
        id=f"{payload['child_run_id']}:cancelled-by-parent",
        tenant=envelope.tenant,
    )


# Events whose follow-up is a command to another run (their ids make a republished copy a no-op).
RUN_COMMANDS: dict[str, Callable[[Envelope], Envelope]] = {
    "ChildRunRequested": lambda envelope: start_child(envelope.run_id, envelope.tenant, envelope.payload),
    "ChildCancelRequested": _cancel_child,
}


class _LedgerWriter:
    """Batches the outbox's position and active-run updates: one transaction per interval.

    A position written late only means republishing a few events after a crash, which every
    consumer dedupes by (run, version); position and active runs always move together.
    """

    INTERVAL_SECONDS = 0.2

    def __init__(self, position: int) -> None:
        self.position = position
        self._marks: dict[str, bool] = {}  # run id -> active, the last mark of the interval
        self._flushed = position
        self._last = time.monotonic()

    @property
    def pending(self) -> bool:
        return self.position != self._flushed

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.INTERVAL_SECONDS or len(self._marks) > 5000

    def mark(self, run_id: str, active: bool) -> None:
        """A run starts or ends needing the engine (a run that ended may still have deliveries)."""
        self._marks[run_id] = active

    def flush(self, ledger: Ledger) -> None:
        marks, self._marks = self._marks, {}
        started = [run_id for run_id, active in marks.items() if active]
        finished = [run_id for run_id, active in marks.items() if not active]
        ledger.advance(OUTBOX, self.position, started, finished)
        self._flushed = self.position
        self._last = time.monotonic()


def _load_runs(store: RunStore, run_ids: list[str]) -> list[Run]:
    runs = []
    for run_id in run_ids:
        try:
            run = store.run(run_id)
        except KeyError:
            continue
        if run.status in ACTIVE_RUN or run.pending_deliveries():
            runs.append(run)
    return runs


def _child_progress(store: RunStore, parent: Run, request: dict[str, Any]) -> Envelope:
    """What a waiting subworkflow node needs: its child's result if it finished, else its start."""
    try:
        child = store.run(request["child_run_id"])
    except KeyError:
        return start_child(parent.run_id, parent.tenant, request)
    if child.status in ACTIVE_RUN:
        return start_child(parent.run_id, parent.tenant, request)  # a duplicate: changes nothing
    assert child.parent is not None
    return child_result(child.parent, child.tenant, child.run_id, child.status, child.outputs, child.error)


def _unfinished_attempts(store: RunStore, runs: list[Run]) -> list[Attempt]:
    """The attempts the runs wait for, each with the version of the event that scheduled it."""
    attempts: list[Attempt] = []
    for run in runs:
        wanted = {a["attempt_id"] for a in run.unfinished_attempts()}
        if not wanted:
            continue
        found = []
        # Newest first: an unfinished attempt was scheduled after everything that finished.
        events: Iterator[Any] = store.events.get(run_uuid(run.run_id), desc=True)
        for event in events:
            if type(event).__name__ == "NodeScheduled" and event.attempt_id in wanted:
                wanted.discard(event.attempt_id)
                version = int(event.originator_version)
                found.append(
                    Attempt(
                        run_id=run.run_id,
                        attempt_id=event.attempt_id,
                        tenant=run.tenant,
                        workflow=run.workflow,
                        node_type=event.node_type,
                        version=version,
                    )
                )
                if not wanted:
                    break
        attempts.extend(reversed(found))
    return attempts


def _scheduled_payloads(store: RunStore, attempts: list[Attempt]) -> list[dict[str, Any]]:
    """The NodeScheduled payloads (the tasks) of the attempts, one indexed read each."""
    payloads = []
    for attempt in attempts:
        (event,) = store.events.get(run_uuid(attempt.run_id), gt=attempt.version - 1, lte=attempt.version)
        payloads.append(event_payload(event))
    return payloads


def _is_text(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _Raw:
    """A rejected command shaped like a Kafka message, for its dead letter."""

    def __init__(self, command: Envelope) -> None:
        self.key = command.run_id.encode()
        self.value = encode(command)
