"""Kafka topic triggers: every message on a topic a deployed workflow triggers on starts one run.

The triggers in force are those of each workflow's latest deployed version, read from the
event store's notification log (its `Deployed` events), on from where the last read stopped,
once per `trigger_poll_seconds`. The consumer follows their topics in the consumer group
`{group}-triggers`: workers sharing a group share the topics' partitions.

Exactly one run per message and workflow, also when a message comes again (a crash before the
commit, a rebalance, a reset of the group's offsets): the run id is a uuid5 of tenant, workflow,
topic, partition, offset and the message's timestamp, and a StartRun for a run that exists
changes nothing. The timestamp is there because the embedded broker keeps nothing across
restarts: its offsets start at 0 again, and a new message must not pass for an old one.

Backpressure: one batch of at most `trigger_batch` messages at a time; its offsets are committed
once the broker has acknowledged every StartRun and dead letter of it, and only then is the
next batch taken. A message that cannot be decoded or mapped, or whose input the workflow's
input schema refuses, becomes a dead letter with the reason; the consumer goes on.

A trigger sees the messages published since the version that declared it (or the unbroken run
of versions before it with a trigger on that topic) was deployed, by the message's timestamp:
deploying a trigger on a topic with history does not start a run per old message.

Why an aiokafka consumer and not a Faust agent: the topics are known only at run time, from
deployments, and change with them. A Faust agent is bound to the channel it was declared with;
new topics reach a running Faust app only through its conductor, which waits a hard-coded
45 s (`Conductor._resubscribe_sleep_lock_seconds`) before resubscribing and drops a change
that lands during a rebalance; removing a topic or agent from a running app crashes it
(robinhood/faust#664). A Faust app is also one consumer group, so a group of its own would
need a second app. An aiokafka consumer resubscribes at once (`subscribe` replaces the set),
commits exactly the offsets we choose, and shares the engine's fetch tuning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from pydantic import ValidationError

from aggregates.run import Rejected
from aggregates.store import RunStore, TopicFollower, check_input
from aggregates.workflow import DEPLOYED
from schemas.definition import MESSAGE, KafkaTrigger, WorkflowDefinition
from schemas.envelope import Envelope
from schemas.expressions import ExpressionError, evaluate, evaluate_mapping
from streams.kafka import group_consumer

if TYPE_CHECKING:
    from streams.engine import Engine

log = logging.getLogger(__name__)

TRIGGERED_RUNS = uuid.UUID("0b6f2c9e-5d41-4f7a-8e3b-2a9c7d1e4f60")
DEFAULT_TENANT = "default"


def tenant_of(workflow: str) -> str:
    """The tenant of a deployed workflow: the gateway and `citadel deploy` deploy a tenant's
    workflow NAME as TENANT.NAME (tenants contain no dot); an unscoped name is the default's."""
    return workflow.split(".", 1)[0] if "." in workflow else DEFAULT_TENANT


def triggered_run_id(tenant: str, workflow: str, message: ConsumerRecord[bytes, bytes]) -> str:
    origin = (tenant, workflow, message.topic, message.partition, message.offset, message.timestamp)
    return str(uuid.uuid5(TRIGGERED_RUNS, "\n".join(str(part) for part in origin)))


@dataclass(frozen=True)
class TopicTriggers:
    """One workflow's triggers on one topic, as its latest version declares them."""

    definition: WorkflowDefinition
    triggers: tuple[KafkaTrigger, ...]
    since_ms: int  # messages older than this are not for these triggers

    @property
    def workflow(self) -> str:
        return self.definition.name


class DeployedTriggers:
    """The triggers in force, by topic; `read` brings them up to date from the store."""

    def __init__(self) -> None:
        self.deployments = TopicFollower(DEPLOYED)
        # workflow -> version -> (topics it triggers on, deployed at in ms)
        self._versions: dict[str, dict[int, tuple[frozenset[str], int]]] = {}
        self._latest: dict[str, WorkflowDefinition] = {}
        self.by_topic: dict[str, list[TopicTriggers]] = {}

    def read(self, store: RunStore) -> bool:
        """Read the deployments recorded since the last read; True if the triggers changed."""
        changed = False
        for _, deployed in self.deployments.read(store):
            try:
                definition = WorkflowDefinition.model_validate(deployed.definition)
            except ValidationError as exc:  # written by an engine whose language differed
                log.warning("a deployed definition does not load; its triggers are ignored: %s", exc)
                continue
            changed |= self._deployed(definition, int(deployed.timestamp.timestamp() * 1000))
        if changed:
            self.by_topic = self._by_topic()
        return changed

    def _deployed(self, definition: WorkflowDefinition, deployed_ms: int) -> bool:
        versions = self._versions.setdefault(definition.name, {})
        versions[definition.version] = (frozenset(t.topic for t in definition.triggers), deployed_ms)
        latest = self._latest.get(definition.name)
        if latest is not None and latest.version > definition.version:
            return False
        self._latest[definition.name] = definition
        return bool(definition.triggers) or (latest is not None and bool(latest.triggers))

    def _by_topic(self) -> dict[str, list[TopicTriggers]]:
        by_topic: dict[str, list[TopicTriggers]] = {}
        for name, definition in sorted(self._latest.items()):
            for topic in dict.fromkeys(t.topic for t in definition.triggers):
                triggers = tuple(t for t in definition.triggers if t.topic == topic)
                since = self._since(name, topic)
                by_topic.setdefault(topic, []).append(TopicTriggers(definition, triggers, since))
        return by_topic

    def _since(self, workflow: str, topic: str) -> int:
        """When the unbroken run of latest versions with a trigger on `topic` began."""
        since = 0
        for version in sorted(self._versions[workflow], reverse=True):
            topics, deployed_ms = self._versions[workflow][version]
            if topic not in topics:
                break
            since = deployed_ms
        return since


def message_context(message: ConsumerRecord[bytes, bytes]) -> tuple[dict[str, Any], str | None]:
    """What a trigger's expressions see of a message, and why its value is not JSON (if not)."""
    value: Any = None
    undecodable = None
    if message.value:
        try:
            value = orjson.loads(message.value)
        except orjson.JSONDecodeError as exc:
            undecodable = f"the message value is not JSON ({exc})"
    context = {
        "topic": message.topic,
        "partition": message.partition,
        "offset": message.offset,
        "timestamp": message.timestamp,
        "key": None if message.key is None else message.key.decode("utf-8", "replace"),
        "headers": {name: raw.decode("utf-8", "replace") for name, raw in message.headers or ()},
        "value": value,
    }
    return {MESSAGE: context}, undecodable


class TriggerFailed(Exception):
    """A trigger could not turn a message into a run's input; the message says why."""


def run_input(
    triggers: TopicTriggers, context: dict[str, Any], undecodable: str | None
) -> dict[str, Any] | None:
    """The run input the first matching trigger maps the message to; None if no filter holds."""
    because = f"; {undecodable}" if undecodable else ""
    for trigger in triggers.triggers:
        where = f"trigger on {trigger.topic!r} of workflow {triggers.workflow!r}"
        if trigger.filter is not None:
            try:
                holds = evaluate(trigger.filter, context)
            except ExpressionError as exc:
                raise TriggerFailed(f"{where}: filter: {exc}{because}") from None
            if not isinstance(holds, bool):
                raise TriggerFailed(f"{where}: filter must give a boolean, got {type(holds).__name__}")
            if not holds:
                continue
        source = trigger.input
        try:
            mapped = (
                evaluate(source, context) if isinstance(source, str) else evaluate_mapping(source, context)
            )
        except ExpressionError as exc:
            field = "input: " if isinstance(source, str) else "input."  # a mapping's error names its field
            raise TriggerFailed(f"{where}: {field}{exc}{because}") from None
        if not isinstance(mapped, dict):
            raise TriggerFailed(f"{where}: input must give an object, got {type(mapped).__name__}")
        return mapped
    return None


class Triggers:
    """The engine's trigger consumer: messages in, StartRun commands and dead letters out."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.deployed = DeployedTriggers()
        self.consumer: AIOKafkaConsumer | None = None
        self.topics: frozenset[str] = frozenset()

    @property
    def group(self) -> str:
        return f"{self.engine.settings.group}-triggers"

    async def run(self) -> None:
        poll = self.engine.settings.trigger_poll_seconds
        read_at = -float("inf")
        try:
            while True:
                try:
                    if time.monotonic() - read_at >= poll:
                        read_at = time.monotonic()
                        await self._follow_deployments()
                    if self.consumer is None or not self.topics:
                        await asyncio.sleep(poll)
                        continue
                    await self._take_batch(round(poll * 1000))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # The store or the broker failed us: nothing of the batch was committed,
                    # and it is read again (starting a run twice is a no-op).
                    log.exception("trigger consumer failed; retrying")
                    await asyncio.sleep(1.0)
        finally:
            if self.consumer is not None:
                await self.consumer.stop()  # commits nothing: what was not committed comes again

    async def _take_batch(self, timeout_ms: int) -> None:
        assert self.consumer is not None
        batch = await self.consumer.getmany(
            timeout_ms=timeout_ms, max_records=self.engine.settings.trigger_batch
        )
        if not batch:
            return
        try:
            await self._start_runs(batch)
        except Exception:
            for tp, messages in batch.items():
                with contextlib.suppress(IllegalStateError):  # no longer ours: its new owner reads it
                    self.consumer.seek(tp, messages[0].offset)
            raise

    async def _follow_deployments(self) -> None:
        assert self.engine.store is not None
        if not await self.engine._in_store(self.deployed.read, self.engine.store):
            return
        topics = frozenset(self.deployed.by_topic)
        if topics == self.topics:
            return
        log.info("trigger topics: %s", ", ".join(sorted(topics)) or "none")
        if self.consumer is None:
            self.consumer = self._new_consumer()
            await self.consumer.start()
        if topics:
            self.consumer.subscribe(sorted(topics))
        else:
            self.consumer.unsubscribe()
        self.topics = topics

    def _new_consumer(self) -> AIOKafkaConsumer:
        kafka = self.engine.settings.kafka
        # A topic a trigger names before anyone published to it is noticed soon after.
        consumer = group_consumer(kafka, self.group, metadata_max_age_ms=5000)
        self.engine.app.fetch_tuner.register(consumer)
        return consumer

    async def _start_runs(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        assert self.consumer is not None
        self.engine.app.fetch_tuner.activity()
        starts: list[Envelope] = []
        for messages in batch.values():
            for message in messages:
                for triggers in self.deployed.by_topic.get(message.topic, ()):
                    if message.timestamp < triggers.since_ms:
                        continue
                    try:
                        command = start_command(triggers, message)
                    except TriggerFailed as exc:
                        await self.engine.dead_letter(message.topic, message, str(exc))
                        continue
                    if command is not None:
                        starts.append(command)
        await self.engine.submit(*starts)
        offsets = {tp: messages[-1].offset + 1 for tp, messages in batch.items()}
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The partitions moved to another worker meanwhile: it reads them again, and the
            # run ids make its StartRuns no-ops.
            log.info("trigger offsets not committed (%s); the new owner reads them again", exc)


def start_command(triggers: TopicTriggers, message: ConsumerRecord[bytes, bytes]) -> Envelope | None:
    """The StartRun a message makes of a workflow's triggers, None if it matches none of them;
    TriggerFailed if it cannot be mapped or its input does not fit the workflow."""
    context, undecodable = message_context(message)
    mapped = run_input(triggers, context, undecodable)
    if mapped is None:
        return None
    definition = triggers.definition
    try:
        check_input(definition, mapped)
    except Rejected as exc:
        raise TriggerFailed(f"trigger on {message.topic!r} of workflow {definition.name!r}: {exc}") from None
    tenant = tenant_of(definition.name)
    run_id = triggered_run_id(tenant, definition.name, message)
    return Envelope.new(
        "StartRun",
        run_id,
        {"workflow": definition.name, "workflow_version": definition.version, "input": mapped},
        id=f"{run_id}:triggered",
        tenant=tenant,
    )
