"""The GraphQL schema: one annotated class per type, resolvers thin, the work done in `Backend`."""

from __future__ import annotations

import datetime as dt
import enum
import logging
from collections.abc import AsyncGenerator
from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.dataloader import DataLoader
from strawberry.extensions import MaskErrors, MaxAliasesLimiter, MaxTokensLimiter, QueryDepthLimiter
from strawberry.fastapi import BaseContext
from strawberry.scalars import JSON
from strawberry.types import ExecutionContext, Info
from strawberry.utils.logging import StrawberryLogger

from aggregates.run import Run as RunAggregate
from aggregates.workflow import Workflow as WorkflowAggregate
from gateway.auth import Principal, RateLimit
from gateway.backend import Backend, Deployment, RunTicket, encode_cursor
from gateway.errors import GatewayError, Problem, unauthenticated
from gateway.tenancy import public, public_definition
from schemas.envelope import Envelope

log = logging.getLogger(__name__)

MAX_PAGE = 100


class Context(BaseContext):
    """Per request (or per WebSocket connection): the caller, the backend, the dataloaders."""

    def __init__(self, backend: Backend, rate_limit: RateLimit, principal: Principal | None = None) -> None:
        super().__init__()
        self.backend = backend
        self.rate_limit = rate_limit
        self.principal = principal
        self.runs: DataLoader[str, RunAggregate | None] = DataLoader(self._load_runs)
        self.workflows: DataLoader[str, WorkflowAggregate | None] = DataLoader(self._load_workflows)

    def caller(self, permission: str | None) -> Principal:
        """The verified caller, if its roles grant `permission` (None: any authenticated caller)."""
        if self.principal is None:
            raise unauthenticated("missing bearer token")
        if permission is not None:
            self.principal.require(permission)
        return self.principal

    async def _load_runs(self, run_ids: list[str]) -> list[RunAggregate | None]:
        assert self.principal is not None
        return await self.backend.runs(self.principal, run_ids)

    async def _load_workflows(self, names: list[str]) -> list[WorkflowAggregate | None]:
        assert self.principal is not None
        return await self.backend.workflows(self.principal, names)


def _context(info: Info) -> Context:
    context: Context = info.context
    return context


def plain(value: Any) -> Any:
    """Rows as JSON can carry them (ClickHouse gives datetimes)."""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


# ---- types ------------------------------------------------------------------


@strawberry.type(name="Problem")
class ProblemType:
    location: str
    message: str
    node: str | None

    @classmethod
    def of(cls, problem: Problem) -> ProblemType:
        return cls(location=problem.location, message=problem.message, node=problem.node)


@strawberry.type
class Viewer:
    subject: str
    tenant: str
    roles: list[str]
    permissions: list[str]


@strawberry.type
class WorkflowVersion:
    version: int
    digest: str
    definition: JSON


@strawberry.type(name="Workflow")
class WorkflowType:
    name: str
    latest_version: int
    versions: list[WorkflowVersion]

    @classmethod
    def of(cls, tenant: str, workflow: WorkflowAggregate) -> WorkflowType:
        versions = [
            WorkflowVersion(
                version=int(v),
                digest=known["digest"],
                definition=public_definition(tenant, known["definition"]),
            )
            for v, known in sorted(workflow.versions.items(), key=lambda item: int(item[0]))
        ]
        return cls(
            name=public(tenant, workflow.name), latest_version=workflow.latest_version(), versions=versions
        )

    @strawberry.field(description="the definition of `version` (the latest when absent)")
    def definition(self, version: int | None = None) -> JSON | None:
        chosen = self.latest_version if version is None else version
        return next((v.definition for v in self.versions if v.version == chosen), None)


@strawberry.type
class NodeState:
    id: str
    status: str
    attempt: int
    error_class: str | None
    error: str | None
    output: JSON | None


def node_states(nodes: dict[str, Any]) -> list[NodeState]:
    return [
        NodeState(
            id=node_id,
            status=node["status"],
            attempt=node.get("attempt", 0),
            error_class=node.get("error_class"),
            error=node.get("error"),
            output=plain(node.get("output")),
        )
        for node_id, node in nodes.items()
    ]


@strawberry.type
class Attempt:
    node_id: str
    attempt: int
    attempt_id: str
    node_type: str
    status: str
    scheduled_at: dt.datetime
    finished_at: dt.datetime | None = None
    duration_ms: float | None = None
    error_class: str | None = None
    message: str | None = None


def attempts_of(events: list[Envelope]) -> list[Attempt]:
    attempts: dict[str, Attempt] = {}
    for event in events:
        p = event.payload
        if event.type == "NodeScheduled":
            attempts[p["attempt_id"]] = Attempt(
                node_id=p["node_id"],
                attempt=p["attempt"],
                attempt_id=p["attempt_id"],
                node_type=p["node_type"],
                status="running",
                scheduled_at=event.time,
            )
        elif event.type in ("NodeSucceeded", "NodeFailed") and p.get("attempt_id") in attempts:
            attempt = attempts[p["attempt_id"]]
            attempt.status = "succeeded" if event.type == "NodeSucceeded" else "failed"
            attempt.finished_at = event.time
            attempt.duration_ms = p.get("duration_ms")
            attempt.error_class = p.get("error_class")
            attempt.message = p.get("message")
    return list(attempts.values())


@strawberry.type
class RunEvent:
    run_id: str
    version: int
    type: str
    time: dt.datetime
    node_id: str | None
    payload: JSON
    position: int | None = strawberry.field(
        default=None, description="the event's place in the store's log, to resume an all-runs stream from"
    )

    @classmethod
    def of(cls, event: Envelope, position: int | None = None) -> RunEvent:
        node = event.payload.get("node_id")
        return cls(
            run_id=event.run_id,
            version=event.version or 0,
            type=event.type,
            time=event.time,
            node_id=node if isinstance(node, str) else None,
            payload=plain(event.payload),
            position=position,
        )


@strawberry.type
class RunState:
    run_id: str
    status: str
    version: int
    latest_version: int
    error: str | None
    outputs: JSON | None
    nodes: list[NodeState]


@strawberry.type(name="Run")
class RunType:
    id: str
    workflow: str
    workflow_version: int
    status: str
    version: int
    error: str | None
    input: JSON
    outputs: JSON | None
    rerun_of: JSON | None
    nodes: list[NodeState]

    @classmethod
    def of(cls, tenant: str, run: RunAggregate) -> RunType:
        return cls(
            id=run.run_id,
            workflow=public(tenant, run.workflow),
            workflow_version=run.workflow_version,
            status=run.status,
            version=run.version,
            error=run.error,
            input=plain(run.input),
            outputs=plain(run.outputs),
            rerun_of=run.rerun_of,
            nodes=node_states(run.nodes),
        )

    @strawberry.field(description="every node attempt: status, duration, error")
    async def attempts(self, info: Info) -> list[Attempt]:
        context = _context(info)
        who = context.caller("run:read")
        return attempts_of(await context.backend.run_events(who, self.id))

    @strawberry.field(description="the run's events after version `after`, in order")
    async def history(self, info: Info, after: int = 0) -> list[RunEvent]:
        context = _context(info)
        who = context.caller("run:read")
        return [RunEvent.of(e) for e in await context.backend.run_events(who, self.id, after)]


@strawberry.type
class RunSummary:
    id: str
    workflow: str
    workflow_version: int
    status: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    duration_ms: float | None
    error: str

    @strawberry.field(description="the run itself, from the event store")
    async def run(self, info: Info) -> RunType | None:
        context = _context(info)
        who = context.caller("run:read")
        found = await context.runs.load(self.id)
        return RunType.of(who.tenant, found) if found is not None else None


@strawberry.type
class RunEdge:
    cursor: str
    node: RunSummary


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type
class RunConnection:
    edges: list[RunEdge]
    page_info: PageInfo


def _analytics(query: str) -> Any:
    """A field of `Metrics` answered by `Analytics.<query>` over the window, as JSON rows."""

    async def rows(root: Metrics, info: Info) -> JSON:
        context = _context(info)
        who = context.caller("analytics:read")
        return plain(await context.backend.analytics_of(who, query, root.since, root.until))

    return strawberry.field(resolver=rows)


@strawberry.type
class Metrics:
    """Analytics from the ClickHouse projections over [since, until); each list is rows as JSON."""

    since: dt.datetime
    until: dt.datetime
    runs_by_status: JSON = _analytics("runs_by_status")
    runs_per_minute: JSON = _analytics("runs_per_minute")
    node_executions_per_minute: JSON = _analytics("node_executions_per_minute")
    workflow_failure_rates: JSON = _analytics("workflow_failure_rates")
    node_type_failure_rates: JSON = _analytics("node_type_failure_rates")
    node_durations: JSON = _analytics("node_durations")
    run_durations: JSON = _analytics("run_durations")
    slowest_nodes: JSON = _analytics("slowest_nodes")
    top_error_classes: JSON = _analytics("top_error_classes")


@strawberry.type
class DeployResult:
    workflow: str | None
    version: int | None
    created: bool
    problems: list[ProblemType]

    @classmethod
    def of(cls, deployment: Deployment) -> DeployResult:
        return cls(
            workflow=deployment.workflow,
            version=deployment.version,
            created=deployment.created,
            problems=[ProblemType.of(p) for p in deployment.problems],
        )


@strawberry.type(name="RunTicket")
class RunTicketType:
    """A command accepted for a run; watch `runEvents(runId)` to see it take effect."""

    run_id: str
    command_id: str

    @classmethod
    def of(cls, ticket: RunTicket) -> RunTicketType:
        return cls(run_id=ticket.run_id, command_id=ticket.command_id)


@strawberry.enum
class RerunDefinition(enum.Enum):
    ORIGINAL = "original"
    CURRENT = "current"


# ---- operations -------------------------------------------------------------


def _window(since: dt.datetime | None, until: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    _zoned(since=since, until=until)
    end = until or dt.datetime.now(dt.UTC)
    start = since or end - dt.timedelta(days=1)
    return start, end


def _zoned(**moments: dt.datetime | None) -> None:
    """Times without a zone are ambiguous: refuse them, naming the argument."""
    for name, moment in moments.items():
        if moment is not None and moment.tzinfo is None:
            raise GatewayError(f"`{name}` needs a time zone (e.g. 2026-01-01T00:00:00Z)", "BAD_REQUEST")


@strawberry.type
class Query:
    @strawberry.field(description="who the bearer token says the caller is")
    def me(self, info: Info) -> Viewer:
        who = _context(info).caller(None)
        return Viewer(
            subject=who.subject, tenant=who.tenant, roles=list(who.roles), permissions=sorted(who.permissions)
        )

    @strawberry.field(description="the caller's tenant's deployed workflows")
    async def workflows(self, info: Info) -> list[WorkflowType]:
        context = _context(info)
        who = context.caller("workflow:read")
        names = await context.backend.workflow_names(who)
        found = await context.workflows.load_many(names)
        return [WorkflowType.of(who.tenant, w) for w in found if w is not None]

    @strawberry.field
    async def workflow(self, info: Info, name: str) -> WorkflowType | None:
        context = _context(info)
        who = context.caller("workflow:read")
        found = await context.workflows.load(name)
        return WorkflowType.of(who.tenant, found) if found is not None else None

    @strawberry.field(description="runs, newest first, from the projections; `after` is a cursor")
    async def runs(
        self,
        info: Info,
        workflow: str | None = None,
        status: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        first: int = 20,
        after: str | None = None,
    ) -> RunConnection:
        context = _context(info)
        who = context.caller("run:read")
        if not 1 <= first <= MAX_PAGE:
            raise GatewayError(f"`first` must be between 1 and {MAX_PAGE}", "BAD_REQUEST")
        _zoned(since=since, until=until)
        rows, more = await context.backend.list_runs(who, workflow, status, since, until, first, after)
        edges = [
            RunEdge(
                cursor=encode_cursor(row["started_at"], row["run_id"]),
                node=RunSummary(
                    id=row["run_id"],
                    workflow=row["workflow"],
                    workflow_version=row["workflow_version"],
                    status=row["status"],
                    started_at=row["started_at"],
                    finished_at=row["finished_at"],
                    duration_ms=row["duration_ms"],
                    error=row["error"],
                ),
            )
            for row in rows
        ]
        return RunConnection(
            edges=edges,
            page_info=PageInfo(has_next_page=more, end_cursor=edges[-1].cursor if edges else None),
        )

    @strawberry.field(description="one run as the event store has it now")
    async def run(self, info: Info, id: str) -> RunType:
        context = _context(info)
        who = context.caller("run:read")
        return RunType.of(who.tenant, await context.backend.run(who, id))

    @strawberry.field(description="one run's state as it was at `version` (time travel)")
    async def run_at(self, info: Info, id: str, version: int) -> RunState:
        context = _context(info)
        who = context.caller("run:read")
        if version < 1:
            raise GatewayError("`version` starts at 1", "BAD_REQUEST")
        state = await context.backend.run_at(who, id, version)
        return RunState(
            run_id=state["run_id"],
            status=state["status"],
            version=state["version"],
            latest_version=state["latest_version"],
            error=state["error"],
            outputs=plain(state["outputs"]),
            nodes=node_states(state["nodes"]),
        )

    @strawberry.field(description="a run's audit trail, as the ClickHouse projection holds it")
    async def audit(self, info: Info, run_id: str) -> JSON:
        context = _context(info)
        who = context.caller("analytics:read")
        return plain(await context.backend.audit(who, run_id))

    @strawberry.field(description="analytics over [since, until) (the last day by default)")
    def metrics(
        self, info: Info, since: dt.datetime | None = None, until: dt.datetime | None = None
    ) -> Metrics:
        _context(info).caller("analytics:read")
        start, end = _window(since, until)
        return Metrics(since=start, until=end)


@strawberry.type
class Mutation:
    @strawberry.mutation(description="deploy a definition version; problems name node and field")
    async def deploy_workflow(self, info: Info, definition: JSON) -> DeployResult:
        context = _context(info)
        who = context.caller("workflow:deploy")
        return DeployResult.of(await context.backend.deploy(who, definition))

    @strawberry.mutation(description="start a run; the same idempotency key always names the same run")
    async def start_run(
        self,
        info: Info,
        workflow: str,
        input: JSON | None = None,
        version: int | None = None,
        idempotency_key: str | None = None,
    ) -> RunTicketType:
        context = _context(info)
        who = context.caller("run:start")
        run_input: Any = {} if input is None else input
        if not isinstance(run_input, dict):
            raise GatewayError("`input` must be a JSON object", "INVALID_INPUT")
        return RunTicketType.of(
            await context.backend.start_run(who, workflow, version, run_input, idempotency_key)
        )

    @strawberry.mutation
    async def cancel_run(self, info: Info, run_id: str, reason: str = "cancelled by user") -> RunTicketType:
        context = _context(info)
        who = context.caller("run:cancel")
        return RunTicketType.of(await context.backend.cancel(who, run_id, reason))

    @strawberry.mutation(description="answer an approval node")
    async def signal(
        self, info: Info, run_id: str, node_id: str, payload: JSON | None = None
    ) -> RunTicketType:
        context = _context(info)
        who = context.caller("run:signal")
        return RunTicketType.of(await context.backend.signal(who, run_id, node_id, payload))

    @strawberry.mutation(description="retry a failed node of an ended run: a new run, rerun from that node")
    async def retry_node(
        self, info: Info, run_id: str, node_id: str, idempotency_key: str | None = None
    ) -> RunTicketType:
        context = _context(info)
        who = context.caller("run:retry")
        return RunTicketType.of(await context.backend.retry_node(who, run_id, node_id, idempotency_key))

    @strawberry.mutation(description="a new run reusing what ran before `fromNode`, executing it and after")
    async def rerun(
        self,
        info: Info,
        run_id: str,
        from_node: str,
        definition: RerunDefinition = RerunDefinition.ORIGINAL,
        idempotency_key: str | None = None,
    ) -> RunTicketType:
        context = _context(info)
        who = context.caller("run:rerun")
        ticket = await context.backend.rerun(who, run_id, from_node, definition.value, idempotency_key)
        return RunTicketType.of(ticket)

    @strawberry.mutation(description="rebuild every projection from the event store (admin)")
    async def rebuild_projections(self, info: Info) -> int:
        _context(info).caller("projections:rebuild")
        return await _context(info).backend.rebuild_projections()


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="one run's events from `fromVersion` on: history, then live, until it ends"
    )
    async def run_events(
        self, info: Info, run_id: str, from_version: int = 1
    ) -> AsyncGenerator[RunEvent, None]:
        context = _context(info)
        who = context.caller("run:read")
        context.rate_limit.take(who.token_id)
        async for event in context.backend.follow_run(who, run_id, from_version):
            yield RunEvent.of(event)

    @strawberry.subscription(
        description="events of all the tenant's runs (of `workflow`), from store position `fromPosition` "
        "on when given, else from now"
    )
    async def all_run_events(
        self, info: Info, workflow: str | None = None, from_position: int | None = None
    ) -> AsyncGenerator[RunEvent, None]:
        context = _context(info)
        who = context.caller("run:read")
        context.rate_limit.take(who.token_id)
        async for position, event in context.backend.follow_runs(who, workflow, from_position):
            yield RunEvent.of(event, position)


def _should_mask(error: Any) -> bool:
    """Errors meant for the caller (ours, and GraphQL's own about the query) pass; the rest is masked."""
    original = getattr(error, "original_error", None)
    return original is not None and not isinstance(original, GatewayError)


class CitadelSchema(strawberry.Schema):
    """Logs what went wrong inside the gateway at ERROR, with its traceback; a caller's mistake
    (a query that does not validate, a run of another tenant, a bad argument) is the caller's,
    answered in the response and logged at INFO only."""

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        for error in errors:
            if _should_mask(error):
                StrawberryLogger.error(error, execution_context)
            else:
                log.info("refused a GraphQL request: %s (at %s)", error.message, error.path or "the document")


def build_schema(max_depth: int = 10, max_tokens: int = 2000, max_aliases: int = 20) -> strawberry.Schema:
    return CitadelSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        extensions=[
            lambda: QueryDepthLimiter(max_depth=max_depth),
            lambda: MaxTokensLimiter(max_token_count=max_tokens),
            lambda: MaxAliasesLimiter(max_alias_count=max_aliases),
            lambda: MaskErrors(should_mask_error=_should_mask, error_message="internal error"),
        ],
    )
