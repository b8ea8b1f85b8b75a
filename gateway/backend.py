"""What the resolvers call: every read and command of the gateway, scoped to the caller's tenant.

The event store is the authority on runs and workflows (read in one thread, since its calls
block); ClickHouse answers lists and analytics; commands go to `citadel.commands` through
`submit`. A run or workflow of another tenant is reported exactly like one that does not
exist, so an error never tells one tenant about another's ids.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from jsonschema import Draft202012Validator

from aggregates.run import TERMINAL_RUN, Rejected, Run
from aggregates.store import RunStore, TopicFollower
from aggregates.workflow import REGISTERED, VersionConflict, Workflow
from gateway.auth import Principal
from gateway.errors import GatewayError, Problem, not_found
from gateway.live import RunEventHub, follow_run, follow_runs
from gateway.tenancy import owns, public, scoped, scoped_definition
from nodes.secrets import EnvironmentSecrets, SecretStore
from projections.queries import Analytics
from schemas.definition import DefinitionInvalid, parse_definition
from schemas.envelope import Envelope
from streams.engine import event_envelope
from streams.history import history, numbered_history, run_state

T = TypeVar("T")
IDEMPOTENCY = uuid.UUID("5d0b3c9e-8a41-4f0e-b7a2-61c0f4e7d215")
Submit = Callable[[Envelope], Awaitable[None]]


@dataclass(frozen=True)
class RunTicket:
    """A command accepted for a run: the run it names and the command's id."""

    run_id: str
    command_id: str


@dataclass
class Deployment:
    workflow: str | None = None
    version: int | None = None
    created: bool = False
    problems: list[Problem] = field(default_factory=list)


def run_id_for(tenant: str, idempotency_key: str | None) -> str:
    """The same key of the same tenant always names the same run, so a repeated start is a no-op."""
    if idempotency_key is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(IDEMPOTENCY, f"{tenant}/{idempotency_key}"))


def encode_cursor(started_at: dt.datetime, run_id: str) -> str:
    return base64.urlsafe_b64encode(f"{started_at.isoformat()}|{run_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        moment, _, run_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        started_at = dt.datetime.fromisoformat(moment)
    except ValueError:
        raise GatewayError("`after` is not a cursor this gateway gave out", "BAD_CURSOR") from None
    if started_at.tzinfo is None:
        started_at = started_at.replace(tzinfo=dt.UTC)
    return started_at, run_id


class Backend:
    def __init__(
        self,
        store: RunStore,
        submit: Submit,
        hub: RunEventHub,
        analytics: Analytics | None,
        secrets: SecretStore | None = None,
        rebuild_projections: Callable[[Iterable[Envelope]], Awaitable[int]] | None = None,
    ) -> None:
        self.store = store
        self.secrets = secrets or EnvironmentSecrets()  # webhook secrets, as the engine reads them
        self.projector_rebuild = rebuild_projections
        self.submit = submit
        self.hub = hub
        self.analytics = analytics
        self._store_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-store")
        self._clickhouse_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-clickhouse")
        self.start_timeout = 30.0
        self._workflow_names: set[str] = set()
        self._catalog = TopicFollower(REGISTERED)

    def close(self) -> None:
        self._store_thread.shutdown(wait=True)
        self._clickhouse_thread.shutdown(wait=True)

    async def in_store(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._store_thread, function, *args)

    async def in_clickhouse(self, function: Callable[..., T], *args: Any) -> T:
        if self.analytics is None:
            raise GatewayError("no ClickHouse projections are configured for this gateway", "UNAVAILABLE")
        return await asyncio.get_running_loop().run_in_executor(self._clickhouse_thread, function, *args)

    # ---- workflows -------------------------------------------------------

    async def workflow_names(self, who: Principal) -> list[str]:
        names = await self.in_store(self._names)
        return sorted(public(who.tenant, n) for n in names if owns(who.tenant, n))

    def _names(self) -> set[str]:
        """Every workflow name deployed so far: read on from where the last call stopped."""
        self._workflow_names.update(registered.name for _, registered in self._catalog.read(self.store))
        return self._workflow_names

    async def workflows(self, who: Principal, names: list[str]) -> list[Workflow | None]:
        """The caller's workflows by name, in one trip to the store (the workflow dataloader)."""
        stored = [scoped(who.tenant, name) for name in names]
        return await self.in_store(_workflows, self.store, stored)

    async def deploy(self, who: Principal, document: Any) -> Deployment:
        if not isinstance(document, dict):
            return Deployment(problems=[Problem("definition", "a definition must be a JSON object")])
        try:
            definition = parse_definition(document)  # problems named in the caller's own terms
            deployed = parse_definition(scoped_definition(who.tenant, definition.model_dump(mode="json")))
        except DefinitionInvalid as exc:
            return Deployment(problems=[Problem(p.location, p.message, p.node) for p in exc.problems])
        try:
            created = await self.in_store(self.store.deploy, deployed)
        except VersionConflict as exc:
            return Deployment(problems=[Problem("version", str(exc).replace(deployed.name, definition.name))])
        return Deployment(definition.name, definition.version, created)

    # ---- runs: commands --------------------------------------------------

    async def start_run(
        self,
        who: Principal,
        workflow: str,
        version: int | None,
        run_input: dict[str, Any],
        idempotency_key: str | None,
    ) -> RunTicket:
        found = (await self.workflows(who, [workflow]))[0]
        if found is None:
            raise not_found(f"workflow {workflow!r}")
        try:
            definition = found.definition(version)
        except KeyError:
            raise not_found(f"version {version} of workflow {workflow!r}") from None
        problems = input_problems(definition.input, run_input)
        if problems:
            raise GatewayError(
                f"the input does not match the input schema of {workflow!r}", "INVALID_INPUT", problems
            )
        payload = {"workflow": definition.name, "workflow_version": definition.version, "input": run_input}
        return await self._start(who, run_id_for(who.tenant, idempotency_key), payload)

    async def cancel(self, who: Principal, run_id: str, reason: str) -> RunTicket:
        await self.run(who, run_id)
        return await self._send(who, "CancelRun", run_id, {"reason": reason})

    async def signal(self, who: Principal, run_id: str, node_id: str, payload: Any) -> RunTicket:
        run = await self.run(who, run_id)
        node = run.nodes.get(node_id)
        if node is None or run.spec.node(node_id).type != "approval":
            raise GatewayError(f"run {run_id} has no approval node {node_id!r}", "NOT_FOUND")
        return await self._send(who, "Signal", run_id, {"node_id": node_id, "payload": payload})

    async def rerun(
        self, who: Principal, run_id: str, from_node: str, definition: str, idempotency_key: str | None
    ) -> RunTicket:
        """A new run reusing what ran before `from_node` and executing it and all after it."""
        run = await self.run(who, run_id)
        if from_node not in run.nodes:
            raise GatewayError(f"run {run_id} has no node {from_node!r}", "NOT_FOUND")
        rerun = {"run_id": run_id, "from_node": from_node, "definition": definition}
        return await self._start(who, run_id_for(who.tenant, idempotency_key), {"rerun": rerun})

    async def retry_node(
        self, who: Principal, run_id: str, node_id: str, idempotency_key: str | None
    ) -> RunTicket:
        """Retrying a failed node of a finished run is a rerun from it with the run's own definition."""
        run = await self.run(who, run_id)
        if run.nodes.get(node_id, {}).get("status") != "failed":
            raise GatewayError(f"node {node_id!r} of run {run_id} has not failed", "NOT_RETRYABLE")
        if run.status not in TERMINAL_RUN:
            raise GatewayError(
                f"run {run_id} is still {run.status}; retry once it has ended", "NOT_RETRYABLE"
            )
        return await self.rerun(who, run_id, node_id, "original", idempotency_key)

    async def _start(self, who: Principal, run_id: str, payload: dict[str, Any]) -> RunTicket:
        """Start a run and answer once it exists, so the caller may query or watch it at once;
        or at once with the engine's reason if it rejects the start."""
        command = Envelope.new("StartRun", run_id, payload, tenant=who.tenant)
        with (
            self.hub.subscribe(lambda event: event.run_id == run_id) as live,
            self.hub.rejection(command.id) as rejected,
        ):
            await self.submit(command)
            if (await self.runs(who, [run_id]))[0] is None:  # new, not an idempotent repeat
                started = asyncio.ensure_future(live.get())
                either: set[asyncio.Future[Any]] = {started, rejected}
                try:
                    await asyncio.wait(
                        either, timeout=self.start_timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    started.cancel()
                if rejected.done() and not rejected.cancelled():
                    raise GatewayError(f"the engine rejected the start: {rejected.result()}", "REJECTED")
                if not started.done() or started.cancelled():
                    raise GatewayError(
                        f"run {run_id} has not started within {self.start_timeout:g} s: the engine is "
                        "busy; query it later",
                        "NOT_STARTED",
                    )
        return RunTicket(run_id, command.id)

    async def _send(self, who: Principal, kind: str, run_id: str, payload: dict[str, Any]) -> RunTicket:
        command = Envelope.new(kind, run_id, payload, tenant=who.tenant)
        await self.submit(command)
        return RunTicket(run_id, command.id)

    # ---- runs: reads -----------------------------------------------------

    async def run(self, who: Principal, run_id: str) -> Run:
        return (await self.runs(who, [run_id]))[0] or _no_run(run_id)

    async def runs(self, who: Principal, run_ids: list[str]) -> list[Run | None]:
        """The caller's runs by id, in one trip to the store (the run dataloader)."""
        return await self.in_store(_runs, self.store, who.tenant, run_ids)

    async def run_at(self, who: Principal, run_id: str, version: int) -> dict[str, Any]:
        await self.run(who, run_id)
        try:
            return await self.in_store(run_state, self.store, run_id, version)
        except KeyError as exc:
            raise GatewayError(str(exc.args[0]), "NOT_FOUND") from None

    async def run_events(self, who: Principal, run_id: str, after: int = 0) -> list[Envelope]:
        run = await self.run(who, run_id)
        return (await self.in_store(_events_after, self.store, run.run_id, run.tenant, after))[0]

    async def list_runs(
        self,
        who: Principal,
        workflow: str | None,
        status: str | None,
        since: dt.datetime | None,
        until: dt.datetime | None,
        first: int,
        after: str | None,
    ) -> tuple[list[dict[str, Any]], bool]:
        workflows = [scoped(who.tenant, workflow), workflow] if workflow else []
        before = decode_cursor(after) if after else None
        rows = await self.in_clickhouse(
            self._analytics().runs_page, who.tenant, workflows, status, since, until, before, first + 1
        )
        for row in rows:
            row["workflow"] = public(who.tenant, row["workflow"])
        return rows[:first], len(rows) > first

    async def audit(self, who: Principal, run_id: str) -> list[dict[str, Any]]:
        await self.run(who, run_id)
        return await self.in_clickhouse(self._analytics().run_timeline, who.tenant, run_id)

    async def analytics_of(self, who: Principal, query: str, since: dt.datetime, until: dt.datetime) -> Any:
        rows = await self.in_clickhouse(getattr(self._analytics(), query), who.tenant, since, until)
        for row in rows:
            if "workflow" in row:
                row["workflow"] = public(who.tenant, row["workflow"])
        return rows

    def _analytics(self) -> Analytics:
        if self.analytics is None:
            raise GatewayError("no ClickHouse projections are configured for this gateway", "UNAVAILABLE")
        return self.analytics

    async def rebuild_projections(self) -> int:
        """Every projection rebuilt from the event store and swapped in (admin only; see README).

        The live projector of this process does it, pausing meanwhile, and goes on from where it
        was, into the new tables: nothing it would have written during the rebuild is lost with
        the old ones. A projector in another process cannot be paused from here, so then this
        refuses."""
        self._analytics()
        if self.projector_rebuild is None:
            raise GatewayError(
                "no projector runs in this gateway's process, and rebuilding while another process "
                "projects would lose its writes: stop the projector and run `citadel replay projections`",
                "UNAVAILABLE",
            )
        return await self.projector_rebuild(history(self.store))

    # ---- subscriptions ---------------------------------------------------

    async def follow_run(self, who: Principal, run_id: str, from_version: int) -> AsyncIterator[Envelope]:
        run = await self.run(who, run_id)

        async def read(after: int) -> tuple[list[Envelope], bool]:
            return await self.in_store(_events_after, self.store, run.run_id, run.tenant, after)

        async for event in follow_run(self.hub, run_id, from_version, read):
            yield event

    async def follow_runs(
        self, who: Principal, workflow: str | None, from_position: int | None
    ) -> AsyncIterator[tuple[int | None, Envelope]]:
        tenant = who.tenant
        names = {scoped(tenant, workflow), workflow} if workflow else None
        workflows: dict[str, str] = {}  # run id -> stored workflow name, learnt from Started

        def wanted(event: Envelope) -> bool:
            if event.tenant != tenant:
                return False
            if names is None:
                return True
            if event.type == "Started":
                workflows[event.run_id] = event.payload.get("workflow", "")
            return workflows.get(event.run_id) in names

        async def read(position: int) -> tuple[list[tuple[int, Envelope]], int]:
            return await self.in_store(_page_of_history, self.store, position, wanted)

        async for item in follow_runs(self.hub, wanted, from_position, read):
            yield item


def _no_run(run_id: str) -> Run:
    raise not_found(f"run {run_id!r}")


def _workflows(store: RunStore, names: list[str]) -> list[Workflow | None]:
    found: list[Workflow | None] = []
    for name in names:
        try:
            found.append(store.workflow(name))
        except KeyError:
            found.append(None)
    return found


def _runs(store: RunStore, tenant: str, run_ids: list[str]) -> list[Run | None]:
    found: list[Run | None] = []
    for run_id in run_ids:
        try:
            run = store.run(run_id)
        except (KeyError, Rejected, ValueError):
            run = None
        found.append(run if run is not None and run.tenant == tenant else None)
    return found


def _events_after(store: RunStore, run_id: str, tenant: str, after: int) -> tuple[list[Envelope], bool]:
    """The run's events after version `after`, and whether its last event ends it."""
    events = [event_envelope(e, tenant) for e in store.run_events(run_id, after or None)]
    if events and events[-1].type in ("Completed", "Failed", "Cancelled"):
        return events, True
    # Notification attempts may follow the end: the run's status says whether it has ended. The
    # run may have ended since the read above, so what was saved until it ended is read again.
    if store.run(run_id).status not in TERMINAL_RUN:
        return events, False
    last = events[-1].version if events else after
    return events + [event_envelope(e, tenant) for e in store.run_events(run_id, last or None)], True


def _page_of_history(
    store: RunStore, position: int, wanted: Callable[[Envelope], bool], page: int = 1000
) -> tuple[list[tuple[int, Envelope]], int]:
    """The wanted run events among the next `page` notifications from `position`, and where to go on."""
    stop = int(store.recorder.max_notification_id() or 0)
    if position > stop:
        return [], position
    end = min(stop, position + page - 1)
    events = []
    for number, envelope in numbered_history(store, page, position):
        if number > end:
            break
        if wanted(envelope):
            events.append((number, envelope))
    return events, end + 1


def input_problems(schema: dict[str, Any], value: Any) -> list[Problem]:
    errors = sorted(Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.absolute_path))
    return [Problem("input" + "".join(f".{p}" for p in e.absolute_path), e.message) for e in errors]
