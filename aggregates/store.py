"""The event-store application: loads and saves `Run` and `Workflow`, and applies commands in batches.

SQLite by default, PostgreSQL when the store URL says so; the two differ by settings only.
All methods are synchronous: callers on an event loop run them in a thread.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import orjson
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError, Recording
from jsonschema import Draft202012Validator
from pydantic import BaseModel

from aggregates.run import DONE_NODE, Rejected, Run, run_uuid
from aggregates.schedule import Timetable, timetable_id
from aggregates.workflow import VersionConflict, Workflow, tenant_of, workflow_id
from schemas.definition import DefinitionInvalid, WorkflowDefinition, parse_definition
from schemas.envelope import (
    AttemptStarted,
    CancelRun,
    Envelope,
    EnvelopeError,
    NodeFailed,
    NodeSucceeded,
    NotificationAttempted,
    RerunOf,
    Signal,
    StartRun,
    TimerFired,
    command_payload,
)

log = logging.getLogger(__name__)

APPLIED, DUPLICATE, REJECTED = "applied", "duplicate", "rejected"


class Decisions(list["Verdict"]):
    """The verdicts of a batch, in command order, and the events the batch recorded."""

    def __init__(self, verdicts: list[Verdict], recordings: list[Recording[uuid.UUID]]) -> None:
        super().__init__(verdicts)
        self.recordings = recordings


@dataclass(frozen=True)
class Verdict:
    """What became of one command."""

    command: Envelope
    outcome: str
    reason: str = ""


def persistence_env(url: str) -> dict[str, str]:
    """The `eventsourcing` settings for a store URL: sqlite:///path or postgresql://user@host/db.

    A PostgreSQL URL may name a schema with `?schema=NAME` (it must exist).
    """
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = Path(unquote(parsed.path))
        path.parent.mkdir(parents=True, exist_ok=True)
        return {
            "PERSISTENCE_MODULE": "aggregates.sqlite_store",
            "SQLITE_DBNAME": str(path),
            "SQLITE_LOCK_TIMEOUT": "30",
        }
    if parsed.scheme in ("postgresql", "postgres"):
        schema = parse_qs(parsed.query).get("schema", [""])[0]
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_SCHEMA": schema,
            "POSTGRES_DBNAME": parsed.path.lstrip("/") or "postgres",
            "POSTGRES_HOST": parsed.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(parsed.port or 5432),
            "POSTGRES_USER": unquote(parsed.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(parsed.password or ""),
            "POSTGRES_POOL_SIZE": "4",
        }
    raise ValueError(f"unsupported event store URL {url!r}: use sqlite:///PATH or postgresql://...")


class TopicFollower:
    """The store's events of some topics, each read once: every `read` goes on from where the
    last one stopped (the deployments that triggers, schedules and the gateway's catalog follow)."""

    def __init__(self, *topics: str, page: int = 1000) -> None:
        self.topics = list(topics)
        self.page = page
        self.position = 0

    def read(self, store: RunStore) -> list[tuple[str, Any]]:
        """(topic, domain event) of each new notification of the topics, in commit order."""
        recorder = store.recorder
        stop = int(recorder.max_notification_id() or 0)
        found: list[tuple[str, Any]] = []
        while self.position < stop:
            notifications = recorder.select_notifications(
                self.position + 1, self.page, stop=stop, topics=self.topics
            )
            found.extend((n.topic, store.mapper.to_domain_event(n)) for n in notifications)
            self.position = int(notifications[-1].id) if len(notifications) == self.page else stop
        return found


class RunStore(Application[uuid.UUID]):
    name = "Citadel"
    snapshotting_intervals = {Run: 100, Timetable: 100}

    def __init__(self, url: str, snapshot_interval: int = 100, cache_size: int = 10_000) -> None:
        self.url = url
        super().__init__(env=persistence_env(url))
        # The library reads this class-level seam through the instance; set it per store.
        self.snapshotting_intervals = {Run: snapshot_interval, Timetable: 100}  # type: ignore[misc]
        self._cache: OrderedDict[uuid.UUID, Run | Workflow] = OrderedDict()
        self._deployed: set[tuple[str, int, str]] = set()  # (name, version, digest) known saved
        self._recent: OrderedDict[str, None] = OrderedDict()  # ids of commands this store applied
        self._cache_size = cache_size

    # ---- reading ---------------------------------------------------------

    def run(self, run_id: str, version: int | None = None) -> Run:
        """A run, optionally as it was at `version`; KeyError if there is no such run."""
        try:
            run: Run = self.repository.get(run_uuid(run_id), version=version)
        except (AggregateNotFoundError, Rejected):
            raise KeyError(f"no run {run_id!r}") from None
        return run

    def workflow(self, name: str) -> Workflow:
        try:
            workflow: Workflow = self.repository.get(workflow_id(name))
        except AggregateNotFoundError:
            raise KeyError(f"no workflow {name!r} is deployed") from None
        return workflow

    def timetable(self, workflow: str, now: dt.datetime) -> Timetable | None:
        """The workflow's timetable with the latest version's schedules in force, as read now
        (not cached: other workers fire the same schedules); None if it never had schedules.

        The caller fires it and saves it; a save that conflicts means another worker did first.
        """
        try:
            definition = self.workflow(workflow).definition()
        except KeyError:
            return None
        try:
            timetable: Timetable = self.repository.get(timetable_id(workflow))
        except AggregateNotFoundError:
            if not definition.schedules:
                return None
            timetable = Timetable(workflow=workflow, tenant=tenant_of(workflow))
        timetable.adopt(definition, now)
        return timetable

    def run_events(self, run_id: str, after: int | None = None) -> list[Any]:
        """A run's events in order, or only those after version `after`."""
        return list(self.events.get(run_uuid(run_id), gt=after))

    # ---- deciding --------------------------------------------------------

    def decide(self, commands: Sequence[Envelope], now: dt.datetime) -> Decisions:
        """Apply commands in order and save every resulting event in one transaction."""
        poisoned: dict[int, str] = {}
        for _ in range(len(commands) + 3):
            try:
                return self._decide_once(commands, now, poisoned)
            except _CommandCrashed as crash:
                # A bug, not a user error: drop what this batch changed and retry without it.
                self._cache.clear()
                poisoned[crash.index] = crash.reason
            except IntegrityError:
                # Another writer saved the same run first: reload and decide again.
                self._cache.clear()
        raise RuntimeError("could not save a batch of decisions after repeated conflicts")

    def _decide_once(
        self, commands: Sequence[Envelope], now: dt.datetime, poisoned: dict[int, str]
    ) -> Decisions:
        touched: dict[uuid.UUID, Run | Workflow] = {}
        verdicts = []
        for index, command in enumerate(commands):
            if index in poisoned:
                verdicts.append(Verdict(command, REJECTED, poisoned[index]))
                continue
            if command.id in self._recent:
                # Saved by this store moments ago (a worker hands its own results to decide
                # before their published copies arrive): known without loading the run.
                verdicts.append(Verdict(command, DUPLICATE))
                continue
            try:
                payload = command_payload(command)
                outcome = self._apply(command, payload, now, touched)
                verdicts.append(Verdict(command, outcome))
            except (Rejected, EnvelopeError, DefinitionInvalid, VersionConflict, KeyError) as exc:
                reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                verdicts.append(Verdict(command, REJECTED, reason))
            except Exception as exc:
                log.exception("command %s (%s) crashed the decide step", command.id, command.type)
                raise _CommandCrashed(index, f"internal error: {type(exc).__name__}: {exc}") from exc
        recordings = self.save(*touched.values()) if touched else []
        for key, aggregate in touched.items():
            self._remember(key, aggregate)
        for verdict in verdicts:
            if verdict.outcome == APPLIED:
                self._recent[verdict.command.id] = None
        while len(self._recent) > self._cache_size * 10:
            self._recent.popitem(last=False)
        return Decisions(verdicts, recordings)

    def _apply(
        self,
        command: Envelope,
        payload: BaseModel,
        now: dt.datetime,
        touched: dict[uuid.UUID, Run | Workflow],
    ) -> str:
        key = run_uuid(command.run_id)
        if isinstance(payload, StartRun):
            if self._get(key, touched) is not None:
                return DUPLICATE
            parent = payload.parent.model_dump() if payload.parent is not None else None
            if payload.rerun is not None:
                definition, run_input, reused = self._rerun_plan(payload.rerun, command.tenant, touched)
                touched[key] = Run.start(
                    command.run_id,
                    definition,
                    run_input,
                    command.tenant,
                    command.id,
                    now,
                    parent,
                    rerun_of={"run_id": payload.rerun.run_id, "from_node": payload.rerun.from_node},
                    reused=reused,
                )
            else:
                definition = self._definition_for(payload, touched)
                touched[key] = Run.start(
                    command.run_id, definition, payload.input, command.tenant, command.id, now, parent
                )
            started = touched[key]
            assert isinstance(started, Run)
            started.notify_ended(command.id, now)  # a run may end in its first decision
            return APPLIED
        run = self._get(key, touched)
        if not isinstance(run, Run):
            raise Rejected(f"{command.type} for unknown run {command.run_id}")
        if run.has_applied(command.id):
            return DUPLICATE
        version = run.version
        _apply_to_run(run, command, payload, now)
        run.notify_ended(command.id, now)
        if run.version != version:
            touched[key] = run
        return APPLIED

    def _definition_for(
        self, payload: StartRun, touched: dict[uuid.UUID, Run | Workflow]
    ) -> WorkflowDefinition:
        if payload.definition is not None:
            definition = _parse(orjson.dumps(payload.definition, option=orjson.OPT_SORT_KEYS))
            check_input(definition, payload.input)  # before deploying: a rejected start changes nothing
            deployed = (definition.name, definition.version, definition.digest())
            if deployed in self._deployed:
                return definition  # a deployed version never changes: no need to load the workflow
            key = workflow_id(definition.name)
            workflow = self._get(key, touched)
            if not isinstance(workflow, Workflow):
                workflow = Workflow(name=definition.name)
            if workflow.deploy(definition) or workflow.version == 1:
                touched[key] = workflow
            else:
                self._deployed.add(deployed)
            return definition
        if not payload.workflow:
            raise Rejected("StartRun needs either a definition or the name of a deployed workflow")
        workflow = self._get(workflow_id(payload.workflow), touched)
        if not isinstance(workflow, Workflow):
            raise Rejected(f"no workflow {payload.workflow!r} is deployed")
        try:
            definition = workflow.definition(payload.workflow_version)
        except KeyError as exc:
            raise Rejected(exc.args[0]) from None
        check_input(definition, payload.input)
        return definition

    def _rerun_plan(
        self, rerun: RerunOf, tenant: str, touched: dict[uuid.UUID, Run | Workflow]
    ) -> tuple[WorkflowDefinition, dict[str, Any], dict[str, dict[str, Any]]]:
        """The definition, input and reused node outputs of a rerun from `rerun.from_node`."""
        original = self._get(run_uuid(rerun.run_id), touched)
        if not isinstance(original, Run) or original.tenant != tenant:
            raise Rejected(f"no run {rerun.run_id} to rerun")
        if rerun.definition == "original":
            definition = original.spec
        else:
            workflow = self._get(workflow_id(original.workflow), touched)
            if not isinstance(workflow, Workflow):
                raise Rejected(
                    f"workflow {original.workflow!r} is not deployed, so it has no current version"
                )
            definition = workflow.definition()
        if rerun.from_node not in {n.id for n in definition.nodes}:
            raise Rejected(
                f"workflow {definition.name!r} version {definition.version} has no node {rerun.from_node!r}"
            )
        upstream = sorted(definition.upstream(rerun.from_node))
        unfinished = [n for n in upstream if original.nodes.get(n, {}).get("status") not in DONE_NODE]
        if unfinished:
            raise Rejected(
                f"cannot rerun run {rerun.run_id} from {rerun.from_node!r}: upstream node(s) "
                f"{', '.join(repr(n) for n in unfinished)} did not finish in it"
            )
        reused = {
            n: {"status": original.nodes[n]["status"], "output": original.nodes[n].get("output")}
            for n in upstream
        }
        return definition, original.input, reused

    def deploy(self, definition: WorkflowDefinition) -> bool:
        """Deploy a definition version outside of a run (CLI, gateway)."""
        key = workflow_id(definition.name)
        workflow = self._get(key, {})
        if not isinstance(workflow, Workflow):
            workflow = Workflow(name=definition.name)
        is_new = workflow.deploy(definition)
        self.save(workflow)
        self._remember(key, workflow)
        return is_new

    def _get(self, key: uuid.UUID, touched: dict[uuid.UUID, Run | Workflow]) -> Run | Workflow | None:
        if key in touched:
            return touched[key]
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        try:
            aggregate: Run | Workflow = self.repository.get(key)
        except AggregateNotFoundError:
            return None
        self._remember(key, aggregate)
        return aggregate

    def _remember(self, key: uuid.UUID, aggregate: Run | Workflow) -> None:
        if isinstance(aggregate, Workflow):
            return  # other processes (gateway, CLI) deploy versions: always read workflows fresh
        self._cache[key] = aggregate
        self._cache.move_to_end(key)
        if isinstance(aggregate, Run) and aggregate.status != "running":
            del self._cache[key]  # finished runs take no more commands worth caching for
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


class _CommandCrashed(Exception):
    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


@lru_cache(maxsize=512)
def _parse(canonical: bytes) -> WorkflowDefinition:
    """Validating a definition is costly and the same one arrives with every StartRun."""
    return parse_definition(orjson.loads(canonical))


@lru_cache(maxsize=512)
def _input_validator(schema: bytes) -> Draft202012Validator:
    return Draft202012Validator(orjson.loads(schema))


def check_input(definition: WorkflowDefinition, value: dict[str, Any]) -> None:
    validator = _input_validator(orjson.dumps(definition.input, option=orjson.OPT_SORT_KEYS))
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        problems = "; ".join(f"input{''.join(f'.{p}' for p in e.absolute_path)}: {e.message}" for e in errors)
        raise Rejected(f"run input does not match the input schema of {definition.name!r}: {problems}")


def _apply_to_run(run: Run, command: Envelope, payload: BaseModel, now: dt.datetime) -> None:
    if isinstance(payload, AttemptStarted):
        run.attempt_started(payload.node_id, payload.attempt_id, command.id)
    elif isinstance(payload, NodeSucceeded):
        run.node_succeeded(
            payload.node_id,
            payload.attempt_id,
            payload.output,
            payload.duration_ms,
            payload.stdout,
            payload.stderr,
            command.id,
            now,
        )
    elif isinstance(payload, NodeFailed):
        run.node_failed(
            payload.node_id,
            payload.attempt_id,
            payload.error_class,
            payload.message,
            payload.duration_ms,
            payload.stdout,
            payload.stderr,
            command.id,
            now,
        )
    elif isinstance(payload, TimerFired):
        run.timer_fired(payload.timer_id, command.id, now)
    elif isinstance(payload, Signal):
        run.signal(payload.node_id, payload.payload, command.id, now)
    elif isinstance(payload, CancelRun):
        run.cancel(payload.reason, command.id)
    elif isinstance(payload, NotificationAttempted):
        run.notification_attempted(
            payload.delivery_id,
            payload.attempt,
            payload.status_code,
            payload.error_class,
            payload.error,
            command.id,
            now,
        )
    else:
        raise Rejected(f"command type {command.type} does not apply to a run")
