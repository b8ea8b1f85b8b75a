"""The `Run` aggregate: the per-run state machine. Commands in, events out; no I/O.

Every event carries the id of the command that caused it, so a command applied once is
recognised when it is delivered again and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import OrderedDict
from typing import Any

import orjson
from eventsourcing.domain import Aggregate, event

from schemas.definition import (
    CONTROL_TYPES,
    ENGINE_TYPES,
    INDEX,
    ITEM,
    Node,
    WorkflowDefinition,
    retryable_status,
)
from schemas.expressions import INPUT, RUN, ExpressionError, evaluate, evaluate_mapping

# A failure of this class is deterministic (same context, same error), so it never retries.
EXPRESSION_ERROR = "ExpressionError"

RUNNING = "running"
# A run that failed and is running the `compensate` steps of the nodes it completed (saga).
COMPENSATING = "compensating"
ACTIVE_RUN = frozenset({RUNNING, COMPENSATING})
TERMINAL_RUN = frozenset({"completed", "failed", "cancelled"})
PENDING = "pending"  # a notification delivery not yet delivered nor given up
COMPENSATE = ".compensate"
CHILD_RUNS = uuid.UUID("0b6f4f7e-5a0c-4d3e-9e51-8c1d2f0a7b33")
# "recovered": failed for good, but its on_error said continue or named a handler.
DONE_NODE = frozenset({"succeeded", "skipped", "recovered"})


class Rejected(Exception):
    """A command that the run's state machine does not allow; the message says why."""


_SPECS: OrderedDict[str, WorkflowDefinition] = OrderedDict()  # digest -> definition


def _spec(digest: str, document: dict[str, Any]) -> WorkflowDefinition:
    """The parsed definition of a run, shared by every run of the same definition."""
    spec = _SPECS.get(digest)
    if spec is None:
        spec = _SPECS[digest] = WorkflowDefinition.model_validate(document)
        if len(_SPECS) > 256:
            _SPECS.popitem(last=False)
    return spec


def child_run_id(attempt_id: str) -> str:
    """The run a subworkflow attempt starts: derived, so a repeated request starts it once."""
    return str(uuid.uuid5(CHILD_RUNS, attempt_id))


def step_owner(step_id: str) -> str:
    """The node a step (map item `m[3]`, compensation `n.compensate`) runs on behalf of."""
    return step_id.split("[", 1)[0].removesuffix(COMPENSATE)


def run_uuid(run_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(run_id)
    except ValueError:
        raise Rejected(f"run id {run_id!r} is not a UUID") from None


class Run(Aggregate):
    # delivery id -> {index, url, attempt, due_at, outcome, ended_at}: the outgoing webhooks of
    # the run's end (`notify`); None until the run has ended. A class default, for snapshots
    # taken before notifications existed.
    notifications: dict[str, dict[str, Any]] | None = None

    @staticmethod
    def create_id(run_id: str, **_: Any) -> uuid.UUID:
        return run_uuid(run_id)

    @event("Started")
    def __init__(
        self,
        run_id: str,
        workflow: str,
        workflow_version: int,
        definition: dict[str, Any],
        digest: str,
        input: dict[str, Any],
        tenant: str,
        command_id: str,
        parent: dict[str, Any] | None = None,
        rerun_of: dict[str, Any] | None = None,
    ) -> None:
        self.run_id = run_id
        self.rerun_of = rerun_of  # {run_id, from_node} of the run this one reruns
        self.parent = parent  # {run_id, node_id, attempt_id} of the subworkflow node that started it
        self.digest = digest
        self.workflow = workflow
        self.workflow_version = workflow_version
        self.definition = definition
        self.input = input
        self.tenant = tenant
        self.status = RUNNING
        self.outputs: dict[str, Any] | None = None
        self.error: str | None = None
        # node id -> {status, attempt, attempt_id, started, output, error_class, error}
        self.nodes: dict[str, dict[str, Any]] = {
            n["id"]: {"status": "pending", "attempt": 0, "attempt_id": None} for n in definition["nodes"]
        }
        # step id -> state like a node's: map items ("m[3]") and compensations ("n.compensate")
        self.steps: dict[str, dict[str, Any]] = {}
        self.completed: list[str] = []  # nodes in the order they succeeded (compensation order)
        self.compensation: dict[str, Any] | None = None  # {reason, node_id, steps, next}
        self.attempts: dict[str, str] = {}  # attempt id -> node or step id
        self.timers: dict[str, dict[str, Any]] = {}  # pending timer id -> {node_id, attempt, due_at}
        self.applied: dict[str, int] = {command_id: 1}

    # ---- decisions -------------------------------------------------------

    @classmethod
    def start(
        cls,
        run_id: str,
        definition: WorkflowDefinition,
        input: dict[str, Any],
        tenant: str,
        command_id: str,
        now: dt.datetime,
        parent: dict[str, Any] | None = None,
        rerun_of: dict[str, Any] | None = None,
        reused: dict[str, dict[str, Any]] | None = None,
    ) -> Run:
        """A new run; a rerun takes `reused` ({node: {status, output}}) from the run it reruns."""
        run = cls(
            run_id=run_id,
            workflow=definition.name,
            workflow_version=definition.version,
            definition=definition.document,
            digest=definition.digest(),
            input=input,
            tenant=tenant,
            command_id=command_id,
            parent=parent,
            rerun_of=rerun_of,
        )
        for node_id, reuse in (reused or {}).items():
            run._node_reused(
                node_id=node_id, status=reuse["status"], output=reuse.get("output"), command_id=command_id
            )
        run.advance(command_id, now)
        return run

    @property
    def spec(self) -> WorkflowDefinition:
        return _spec(self.digest, self.definition)

    def has_applied(self, command_id: str) -> bool:
        return command_id in self.applied

    def attempt_started(self, node_id: str, attempt_id: str, command_id: str) -> None:
        state = self._node_of_attempt(node_id, attempt_id)
        if (
            not self._takes(node_id)
            or state["attempt_id"] != attempt_id
            or state["status"] != "scheduled"
            or state.get("started")
        ):
            return  # late or repeated news about an attempt: nothing to decide
        self._attempt_started(node_id=node_id, attempt_id=attempt_id, command_id=command_id)

    def node_succeeded(
        self,
        node_id: str,
        attempt_id: str,
        output: Any,
        duration_ms: float,
        stdout: str,
        stderr: str,
        command_id: str,
        now: dt.datetime,
    ) -> None:
        state = self._node_of_attempt(node_id, attempt_id)
        if not self._takes(node_id) or state["attempt_id"] != attempt_id or state["status"] != "scheduled":
            return  # a result for a finished run or a superseded/finished attempt changes nothing
        self._implied_start(state, command_id)
        self._node_succeeded(
            node_id=node_id,
            attempt_id=attempt_id,
            output=output,
            duration_ms=duration_ms,
            stdout=stdout,
            stderr=stderr,
            command_id=command_id,
        )
        self._step_done(node_id, command_id, now)
        self.advance(command_id, now)

    def node_failed(
        self,
        node_id: str,
        attempt_id: str,
        error_class: str,
        message: str,
        duration_ms: float,
        stdout: str,
        stderr: str,
        command_id: str,
        now: dt.datetime,
    ) -> None:
        state = self._node_of_attempt(node_id, attempt_id)
        if not self._takes(node_id) or state["attempt_id"] != attempt_id or state["status"] != "scheduled":
            return
        self._implied_start(state, command_id)
        self._fail_attempt(
            self._node(node_id), state, error_class, message, duration_ms, stdout, stderr, command_id, now
        )
        self._step_done(node_id, command_id, now)

    def timer_fired(self, timer_id: str, command_id: str, now: dt.datetime) -> None:
        if self.status not in ACTIVE_RUN:
            return
        timer = self.timers.get(timer_id)
        if timer is None:
            raise Rejected(f"run {self.run_id} has no pending timer {timer_id!r}")
        node = self._node(timer["node_id"])
        kind = timer.get("kind", "retry")
        if kind == "retry":
            self._schedule(node, timer["attempt"], command_id, now, timer_id=timer_id)
        elif kind == "wait":
            self._complete_control(node, {"waited_until": timer["due_at"]}, command_id)
        elif node.typed_config().on_timeout == "continue":
            self._complete_control(node, {"timed_out": True, "payload": None}, command_id)
        else:
            state = self.nodes[node.id]
            self._fail_attempt(
                node,
                state,
                "ApprovalTimeout",
                f"no signal arrived before {timer['due_at']}",
                0.0,
                "",
                "",
                command_id,
                now,
            )
        self.advance(command_id, now)

    def signal(self, node_id: str, payload: Any, command_id: str, now: dt.datetime) -> None:
        """An answer for a waiting `approval` node."""
        if self.status != RUNNING:
            raise Rejected(f"run {self.run_id} is already {self.status}; it takes no signals")
        state = self.nodes.get(node_id)
        if state is None:
            raise Rejected(f"run {self.run_id} has no node {node_id!r}")
        node = self.spec.node(node_id)
        if node.type != "approval" or state["status"] != "scheduled":
            raise Rejected(
                f"node {node_id!r} of run {self.run_id} is not waiting for a signal "
                f"(it is a {node.type} node, {state['status']})"
            )
        self._complete_control(node, {"timed_out": False, "payload": payload}, command_id)
        self.advance(command_id, now)

    def _complete_control(self, node: Node, output: Any, command_id: str) -> None:
        state = self.nodes[node.id]
        self._node_succeeded(
            node_id=node.id,
            attempt_id=state["attempt_id"],
            output=output,
            duration_ms=0.0,
            stdout="",
            stderr="",
            command_id=command_id,
        )

    def cancel(self, reason: str, command_id: str) -> None:
        """Stop scheduling (a compensation under way stops too) and cancel the child runs."""
        if self.status not in ACTIVE_RUN:
            raise Rejected(f"run {self.run_id} is already {self.status}; it cannot be cancelled")
        self._cancel_children(reason, command_id)
        self._cancelled(reason=reason, command_id=command_id)

    def notify_ended(self, command_id: str, now: dt.datetime) -> None:
        """A run that has just ended schedules a delivery to each `notify` target asking for its end."""
        if self.status not in TERMINAL_RUN or self.notifications is not None:
            return
        deliveries = {
            f"{self.run_id}:notify:{index}": {
                "index": index,
                "url": target.url,
                "attempt": 1,
                "due_at": now.isoformat(),
                "outcome": PENDING,
                "ended_at": now.isoformat(),
            }
            for index, target in enumerate(self.spec.notify)
            if self.status in target.on
        }
        if deliveries:
            self._notifications_scheduled(deliveries=deliveries, command_id=command_id)

    def notification_attempted(
        self,
        delivery_id: str,
        attempt: int,
        status_code: int | None,
        error_class: str | None,
        error: str | None,
        command_id: str,
        now: dt.datetime,
    ) -> None:
        """The outcome of one delivery attempt: delivered, retried after the target's backoff, or
        failed for good once its attempts are spent, or at once when no retry would mend it: a 4xx
        answer other than 429 (as the http node's own retries), or an error class that the policy's
        `retry_on` does not list."""
        delivery = (self.notifications or {}).get(delivery_id)
        if delivery is None:
            raise Rejected(f"run {self.run_id} has no notification delivery {delivery_id!r}")
        if delivery["outcome"] != PENDING or delivery["attempt"] != attempt:
            return  # news of an attempt already recorded
        policy = self.spec.notify[delivery["index"]].retry
        next_attempt_at = None
        client_error = status_code is not None and status_code >= 400 and not retryable_status(status_code)
        if error is None and status_code is not None and 200 <= status_code < 300:
            outcome = "delivered"
        elif client_error or (error_class is not None and not policy.retries(error_class)):
            outcome = "failed"
        elif attempt < policy.max_attempts:
            outcome = "retrying"
            delay = policy.delay_before(attempt + 1, f"{delivery_id}:{attempt + 1}")
            next_attempt_at = (now + dt.timedelta(seconds=delay)).isoformat()
        else:
            outcome = "failed"
        others = len(self.pending_deliveries()) - 1
        self._notification_attempted(
            delivery_id=delivery_id,
            url=delivery["url"],
            attempt=attempt,
            status_code=status_code,
            error_class=error_class,
            error=error,
            outcome=outcome,
            next_attempt_at=next_attempt_at,
            outstanding=others + (outcome == "retrying"),
            command_id=command_id,
        )

    def advance(self, command_id: str, now: dt.datetime) -> None:
        """Schedule every node whose needs are done, skip what a false `when` rules out, finish."""
        spec = self.spec
        progressed = True
        while progressed and self.status == RUNNING:
            progressed = False
            for node in spec.nodes:
                if self.nodes[node.id]["status"] != "pending":
                    continue
                needs = [self.nodes[n]["status"] for n in node.needs]
                if not all(s in DONE_NODE for s in needs):
                    continue
                progressed = True
                routed = self._routing(node)
                if routed is not None:
                    self._node_skipped(node_id=node.id, reason=routed, command_id=command_id)
                elif needs and all(s == "skipped" for s in needs):
                    self._node_skipped(
                        node_id=node.id, reason="every node it needs was skipped", command_id=command_id
                    )
                elif node.when is not None and not self._when_holds(node, command_id, now):
                    pass
                else:
                    self._schedule(node, 1, command_id, now)
                if self.status != RUNNING:
                    return
        if self.status == RUNNING and all(s["status"] in DONE_NODE for s in self.nodes.values()):
            try:
                outputs = evaluate_mapping(spec.outputs, self._context())
            except ExpressionError as exc:
                self._fail_run(f"workflow outputs: {exc}", None, command_id, now)
            else:
                self._completed(outputs=outputs, command_id=command_id)

    # ---- decision helpers ------------------------------------------------

    def _routing(self, node: Node) -> str | None:
        """Why error routing skips `node`, if it does: a handler whose node did not fail, or a
        dependent of a node whose failure went to a handler."""
        spec = self.spec
        for need in node.needs:
            on_error = spec.node(need).on_error
            if isinstance(on_error, str):
                continue
            failed = self.nodes[need]["status"] == "recovered"
            if on_error.handler == node.id and not failed:
                return f"{need!r} did not fail, so its error handler does not run"
            if on_error.handler != node.id and failed:
                return f"{need!r} failed and its error went to {on_error.handler!r}"
        return None

    def _when_holds(self, node: Node, command_id: str, now: dt.datetime) -> bool:
        assert node.when is not None
        try:
            value = evaluate(node.when, self._context())
            if not isinstance(value, bool):
                raise ExpressionError(f"when must be a boolean, got {type(value).__name__}")
        except ExpressionError as exc:
            attempt_id = self._new_attempt_id(node.id, 1)
            self._node_scheduled(
                node_id=node.id,
                attempt=1,
                attempt_id=attempt_id,
                node_type=node.type,
                config={},
                inputs={},
                timeout_seconds=0.0,
                inline=True,
                timer_id=None,
                command_id=command_id,
            )
            self._expression_failed(node, f"when: {exc}", command_id, now)
            return False
        if not value:
            self._node_skipped(node_id=node.id, reason=f"when is false: {node.when}", command_id=command_id)
        return value

    def _schedule(
        self, node: Node, attempt: int, command_id: str, now: dt.datetime, timer_id: str | None = None
    ) -> None:
        attempt_id = self._new_attempt_id(node.id, attempt)
        inline = node.type in ENGINE_TYPES
        context = self._step_context(node.id, attempt)
        inputs: dict[str, Any] = {}
        error: str | None = None
        if not inline:
            try:
                inputs = _attempt_inputs(node, context)
            except ExpressionError as exc:
                error = str(exc)
        self._node_scheduled(
            node_id=node.id,
            attempt=attempt,
            attempt_id=attempt_id,
            node_type=node.type,
            config={} if inline else node.config,
            inputs=inputs,
            timeout_seconds=node.timeout_seconds,
            inline=inline,
            timer_id=timer_id,
            command_id=command_id,
        )
        if error is not None:
            self._expression_failed(node, error, command_id, now)
            return
        if not inline:
            return
        self._attempt_started(node_id=node.id, attempt_id=attempt_id, command_id=command_id)
        if node.type in CONTROL_TYPES:
            self._start_control(node, attempt_id, context, command_id, now)
            return
        try:
            output = _evaluate_inline(node, context)
        except ExpressionError as exc:
            self._expression_failed(node, str(exc), command_id, now)
            return
        self._node_succeeded(
            node_id=node.id,
            attempt_id=attempt_id,
            output=output,
            duration_ms=0.0,
            stdout="",
            stderr="",
            command_id=command_id,
        )

    def _start_control(
        self, node: Node, attempt_id: str, context: dict[str, Any], command_id: str, now: dt.datetime
    ) -> None:
        config = node.typed_config()
        timer_id = f"{node.type}:{attempt_id}"
        if node.type == "map":
            try:
                items = evaluate(config.items, context)
                if not isinstance(items, list):
                    raise ExpressionError(f"items must be a list, got {type(items).__name__}")
            except ExpressionError as exc:
                self._expression_failed(node, f"config.items: {exc}", command_id, now)
                return
            self._map_started(node_id=node.id, attempt_id=attempt_id, items=items, command_id=command_id)
            self._map_fill(node, command_id, now)
            return
        if node.type == "subworkflow":
            try:
                child_input = evaluate_mapping(config.inputs, context)
            except ExpressionError as exc:
                self._expression_failed(node, f"config.inputs.{exc}", command_id, now)
                return
            self._child_run_requested(
                node_id=node.id,
                attempt_id=attempt_id,
                child_run_id=child_run_id(attempt_id),
                workflow=config.workflow,
                version=config.version,
                input=child_input,
                command_id=command_id,
            )
            return
        if node.type == "wait":
            if config.seconds is not None:
                due = now + dt.timedelta(seconds=config.seconds)
            else:
                try:
                    due = _as_time(evaluate(config.until, context))
                except ExpressionError as exc:
                    self._expression_failed(node, f"config.until: {exc}", command_id, now)
                    return
            self._wait_scheduled(
                node_id=node.id,
                attempt_id=attempt_id,
                timer_id=timer_id,
                due_at=due.isoformat(),
                command_id=command_id,
            )
            return
        expires = config.expires_after_seconds
        self._approval_requested(
            node_id=node.id,
            attempt_id=attempt_id,
            timer_id=timer_id if expires is not None else None,
            due_at=(now + dt.timedelta(seconds=expires)).isoformat() if expires is not None else None,
            command_id=command_id,
        )

    def _expression_failed(self, node: Node, message: str, command_id: str, now: dt.datetime) -> None:
        """An expression of the node failed: deterministic, so the attempt fails without retry."""
        self._fail_attempt(
            node, self._state(node.id), EXPRESSION_ERROR, message, 0.0, "", "", command_id, now
        )

    def _fail_attempt(
        self,
        node: Node,
        state: dict[str, Any],
        error_class: str,
        message: str,
        duration_ms: float,
        stdout: str,
        stderr: str,
        command_id: str,
        now: dt.datetime,
    ) -> None:
        attempt = state["attempt"]
        retry = (
            error_class != EXPRESSION_ERROR
            and attempt < node.retry.max_attempts
            and node.retry.retries(error_class)
        )
        self._node_failed(
            node_id=node.id,
            attempt_id=state["attempt_id"],
            error_class=error_class,
            message=message,
            duration_ms=duration_ms,
            stdout=stdout,
            stderr=stderr,
            will_retry=retry,
            command_id=command_id,
        )
        if retry:
            timer_id = f"retry:{state['attempt_id']}"
            delay = node.retry.delay_before(attempt + 1, seed=timer_id)
            due_at = (now + dt.timedelta(seconds=delay)).isoformat()
            self._retry_scheduled(
                node_id=node.id,
                attempt=attempt + 1,
                timer_id=timer_id,
                due_at=due_at,
                delay_seconds=delay,
                command_id=command_id,
            )
        else:
            self._gave_up(node.id, attempt, error_class, message, command_id, now)

    def _gave_up(
        self, node_id: str, attempts: int, error_class: str, message: str, command_id: str, now: dt.datetime
    ) -> None:
        """What the final failure of a node or a step leads to."""
        if node_id.endswith(COMPENSATE):
            return  # recorded; the compensation goes on with the next step
        if node_id not in self.nodes:
            # A map item: its map fails, with the item named.
            owner = step_owner(node_id)
            state = self.nodes[owner]
            message = f"item {node_id[len(owner) + 1 : -1]} failed after {attempts} attempt(s): {message}"
            self._node_failed(
                node_id=owner,
                attempt_id=state["attempt_id"],
                error_class=error_class,
                message=message,
                duration_ms=0.0,
                stdout="",
                stderr="",
                will_retry=False,
                command_id=command_id,
            )
            node_id, attempts = owner, state["attempt"]
        if self.spec.node(node_id).on_error != "fail":
            self._node_recovered(
                node_id=node_id, error_class=error_class, message=message, command_id=command_id
            )
            self.advance(command_id, now)
        else:
            self._fail_run(
                f"node {node_id!r} failed after {attempts} attempt(s): {error_class}: {message}",
                node_id,
                command_id,
                now,
            )

    def _fail_run(self, reason: str, node_id: str | None, command_id: str, now: dt.datetime) -> None:
        """Fail the run; first undo, in reverse order, what the nodes with a `compensate` step did."""
        self._cancel_children(reason, command_id)
        spec = self.spec
        steps = [f"{n}{COMPENSATE}" for n in reversed(self.completed) if spec.node(n).compensate is not None]
        if not steps:
            self._failed(reason=reason, node_id=node_id, command_id=command_id)
            return
        self._compensation_started(reason=reason, node_id=node_id, steps=steps, command_id=command_id)
        self._compensate_next(command_id, now)

    def _compensate_next(self, command_id: str, now: dt.datetime) -> None:
        """Schedule the first compensation step not yet run, one at a time; fail the run after the last."""
        assert self.compensation is not None
        for step_id in self.compensation["steps"]:
            if step_id not in self.steps:
                self._schedule(self._node(step_id), 1, command_id, now)
            if self.steps[step_id]["status"] not in ("succeeded", "failed"):
                return  # its result (or retry) comes later
        failed = [step_owner(s) for s in self.compensation["steps"] if self.steps[s]["status"] == "failed"]
        reason = self.compensation["reason"]
        if failed:
            reason += f"; compensation failed for {', '.join(repr(n) for n in failed)}"
        self._failed(reason=reason, node_id=self.compensation["node_id"], command_id=command_id)

    def _map_fill(self, node: Node, command_id: str, now: dt.datetime) -> None:
        """Schedule a map's next items up to its concurrency; complete it when every item is done."""
        state = self.nodes[node.id]
        concurrency = node.typed_config().concurrency
        items = state["items"]
        while (
            self.status == RUNNING
            and state["status"] == "scheduled"
            and state["next"] < len(items)
            and state["next"] - state["done"] < concurrency
        ):
            self._schedule(self._node(f"{node.id}[{state['next']}]"), 1, command_id, now)
        if self.status == RUNNING and state["status"] == "scheduled" and state["done"] == len(items):
            output = [self.steps[f"{node.id}[{i}]"]["output"] for i in range(len(items))]
            self._complete_control(node, output, command_id)

    def _step_done(self, node_id: str, command_id: str, now: dt.datetime) -> None:
        """A step's attempt ended: let its map or its compensation go on."""
        if node_id in self.nodes:
            return
        if node_id.endswith(COMPENSATE):
            if self.status == COMPENSATING and self.steps[node_id]["status"] in ("succeeded", "failed"):
                self._compensate_next(command_id, now)
        else:
            self._map_fill(self.spec.node(step_owner(node_id)), command_id, now)

    def _cancel_children(self, reason: str, command_id: str) -> None:
        for node_id, state in self.nodes.items():
            if state["status"] == "scheduled" and state.get("child_run_id"):
                self._child_cancel_requested(
                    node_id=node_id, child_run_id=state["child_run_id"], reason=reason, command_id=command_id
                )

    def _takes(self, node_id: str) -> bool:
        """Whether news of this node's or step's attempt can still change the run."""
        if node_id.endswith(COMPENSATE):
            return self.status == COMPENSATING
        if self.status != RUNNING:
            return False
        return node_id in self.nodes or self.nodes[step_owner(node_id)]["status"] == "scheduled"

    def _node(self, node_id: str) -> Node:
        """The node, or the node a step runs as (built from its owner's definition)."""
        if node_id in self.nodes:
            return self.spec.node(node_id)
        owner = self.spec.node(step_owner(node_id))
        if node_id.endswith(COMPENSATE):
            assert owner.compensate is not None
            return owner.step(node_id, owner.compensate)
        return owner.step(node_id, owner.typed_config().node)

    def _state(self, node_id: str) -> dict[str, Any]:
        state = self.nodes.get(node_id)
        return state if state is not None else self.steps[node_id]

    def _implied_start(self, state: dict[str, Any], command_id: str) -> None:
        # A result proves the attempt started. Executors report a start on its own only for
        # attempts that take a while, so a quick node costs one decision, not two.
        if not state.get("started"):
            self._attempt_started(
                node_id=self.attempts[state["attempt_id"]],
                attempt_id=state["attempt_id"],
                command_id=command_id,
            )

    def _node_of_attempt(self, node_id: str, attempt_id: str) -> dict[str, Any]:
        if self.attempts.get(attempt_id) != node_id:
            raise Rejected(f"run {self.run_id} has no attempt {attempt_id!r} of node {node_id!r}")
        return self._state(node_id)

    def _new_attempt_id(self, node_id: str, attempt: int) -> str:
        return f"{self.run_id}:{node_id}:{attempt}"

    def _context(self, attempt: int = 0) -> dict[str, Any]:
        run = {
            "id": self.run_id,
            "workflow": self.workflow,
            "workflow_version": self.workflow_version,
            "tenant": self.tenant,
            "attempt": attempt,
        }
        context: dict[str, Any] = {INPUT: self.input, RUN: run}
        for node_id, state in self.nodes.items():
            if state["status"] in ("succeeded", "recovered"):
                context[node_id] = state["output"]
            elif state["status"] == "skipped":
                context[node_id] = None
        return context

    def _step_context(self, node_id: str, attempt: int) -> dict[str, Any]:
        """The context of a node's or step's attempt: a map item also sees `item` and `index`."""
        context = self._context(attempt)
        if node_id not in self.nodes and not node_id.endswith(COMPENSATE):
            owner = step_owner(node_id)
            index = int(node_id[len(owner) + 1 : -1])
            context[ITEM], context[INDEX] = self.nodes[owner]["items"][index], index
        return context

    # ---- events: each method body is how the event changes the state -----

    @event("NodeScheduled")
    def _node_scheduled(
        self,
        node_id: str,
        attempt: int,
        attempt_id: str,
        node_type: str,
        config: dict[str, Any],
        inputs: dict[str, Any],
        timeout_seconds: float,
        inline: bool,
        timer_id: str | None,
        command_id: str,
    ) -> None:
        state = self.nodes.get(node_id)
        if state is None:
            state = self.steps.setdefault(node_id, {"status": "pending", "attempt": 0, "attempt_id": None})
            if attempt == 1 and not node_id.endswith(COMPENSATE):
                self.nodes[step_owner(node_id)]["next"] += 1
        state.update(status="scheduled", attempt=attempt, attempt_id=attempt_id, started=False, inputs=inputs)
        self.attempts[attempt_id] = node_id
        if timer_id is not None:
            self.timers.pop(timer_id, None)
        self.applied[command_id] = 1

    @event("AttemptStarted")
    def _attempt_started(self, node_id: str, attempt_id: str, command_id: str) -> None:
        self._state(node_id)["started"] = True
        self.applied[command_id] = 1

    @event("NodeSucceeded")
    def _node_succeeded(
        self,
        node_id: str,
        attempt_id: str,
        output: Any,
        duration_ms: float,
        stdout: str,
        stderr: str,
        command_id: str,
    ) -> None:
        self._state(node_id).update(status="succeeded", output=output)
        if node_id in self.nodes:
            self.completed.append(node_id)
        elif not node_id.endswith(COMPENSATE):
            self.nodes[step_owner(node_id)]["done"] += 1
        self._drop_timers(node_id)
        self.applied[command_id] = 1

    @event("NodeFailed")
    def _node_failed(
        self,
        node_id: str,
        attempt_id: str,
        error_class: str,
        message: str,
        duration_ms: float,
        stdout: str,
        stderr: str,
        will_retry: bool,
        command_id: str,
    ) -> None:
        self._state(node_id).update(
            status="retry_wait" if will_retry else "failed", error_class=error_class, error=message
        )
        self._drop_timers(node_id)
        self.applied[command_id] = 1

    @event("RetryScheduled")
    def _retry_scheduled(
        self,
        node_id: str,
        attempt: int,
        timer_id: str,
        due_at: str,
        delay_seconds: float,
        command_id: str,
    ) -> None:
        self.timers[timer_id] = {"node_id": node_id, "attempt": attempt, "due_at": due_at}
        self.applied[command_id] = 1

    @event("WaitScheduled")
    def _wait_scheduled(
        self, node_id: str, attempt_id: str, timer_id: str, due_at: str, command_id: str
    ) -> None:
        self._arm(timer_id, node_id, due_at, "wait")
        self.applied[command_id] = 1

    @event("ApprovalRequested")
    def _approval_requested(
        self, node_id: str, attempt_id: str, timer_id: str | None, due_at: str | None, command_id: str
    ) -> None:
        if timer_id is not None and due_at is not None:
            self._arm(timer_id, node_id, due_at, "approval")
        self.applied[command_id] = 1

    def _arm(self, timer_id: str, node_id: str, due_at: str, kind: str) -> None:
        self.timers[timer_id] = {
            "node_id": node_id,
            "attempt": self._state(node_id)["attempt"],
            "due_at": due_at,
            "kind": kind,
        }

    @event("MapStarted")
    def _map_started(self, node_id: str, attempt_id: str, items: list[Any], command_id: str) -> None:
        self.nodes[node_id].update(items=items, next=0, done=0)
        self.applied[command_id] = 1

    @event("ChildRunRequested")
    def _child_run_requested(
        self,
        node_id: str,
        attempt_id: str,
        child_run_id: str,
        workflow: str,
        version: int | None,
        input: dict[str, Any],
        command_id: str,
    ) -> None:
        self.nodes[node_id].update(
            child_run_id=child_run_id, child={"workflow": workflow, "version": version, "input": input}
        )
        self.applied[command_id] = 1

    @event("ChildCancelRequested")
    def _child_cancel_requested(self, node_id: str, child_run_id: str, reason: str, command_id: str) -> None:
        self.applied[command_id] = 1

    @event("CompensationStarted")
    def _compensation_started(
        self, reason: str, node_id: str | None, steps: list[str], command_id: str
    ) -> None:
        self.status = COMPENSATING
        self.compensation = {"reason": reason, "node_id": node_id, "steps": steps}
        self.timers.clear()
        self.applied[command_id] = 1

    @event("NodeReused")
    def _node_reused(self, node_id: str, status: str, output: Any, command_id: str) -> None:
        # Done in the run this one reruns: its output is taken as it was, and it is not compensated.
        self.nodes[node_id].update(status=status, output=output)
        self.applied[command_id] = 1

    @event("NodeRecovered")
    def _node_recovered(self, node_id: str, error_class: str, message: str, command_id: str) -> None:
        self.nodes[node_id].update(
            status="recovered", output={"error_class": error_class, "message": message}
        )
        self.applied[command_id] = 1

    @event("NodeSkipped")
    def _node_skipped(self, node_id: str, reason: str, command_id: str) -> None:
        self.nodes[node_id]["status"] = "skipped"
        self.applied[command_id] = 1

    @event("Completed")
    def _completed(self, outputs: dict[str, Any], command_id: str) -> None:
        self.status = "completed"
        self.outputs = outputs
        self.applied[command_id] = 1

    @event("Failed")
    def _failed(self, reason: str, node_id: str | None, command_id: str) -> None:
        self.status = "failed"
        self.error = reason
        self.timers.clear()
        self.applied[command_id] = 1

    @event("Cancelled")
    def _cancelled(self, reason: str, command_id: str) -> None:
        self.status = "cancelled"
        self.error = reason
        self.timers.clear()
        self.applied[command_id] = 1

    @event("NotificationsScheduled")
    def _notifications_scheduled(self, deliveries: dict[str, dict[str, Any]], command_id: str) -> None:
        self.notifications = deliveries
        self.applied[command_id] = 1

    @event("NotificationAttempted")
    def _notification_attempted(
        self,
        delivery_id: str,
        url: str,
        attempt: int,
        status_code: int | None,
        error: str | None,
        outcome: str,
        next_attempt_at: str | None,
        outstanding: int,
        command_id: str,
        error_class: str | None = None,  # absent from events recorded before it was
    ) -> None:
        # `outstanding`: deliveries of this run still pending after this attempt.
        assert self.notifications is not None
        delivery = self.notifications[delivery_id]
        if outcome == "retrying":
            delivery.update(attempt=attempt + 1, due_at=next_attempt_at)
        else:
            delivery["outcome"] = outcome
        self.applied[command_id] = 1

    def _drop_timers(self, node_id: str) -> None:
        # A wait or an approval ended: its timer has nothing left to do.
        for timer_id in [
            t
            for t, timer in self.timers.items()
            if timer["node_id"] == node_id and timer.get("kind") in ("wait", "approval")
        ]:
            del self.timers[timer_id]

    # ---- queries ---------------------------------------------------------

    def waiting_children(self) -> list[dict[str, Any]]:
        """The child runs that subworkflow nodes are waiting for (to request again on start)."""
        if self.status != RUNNING:
            return []
        return [
            {
                "node_id": node_id,
                "attempt_id": state["attempt_id"],
                "child_run_id": state["child_run_id"],
                **state["child"],
            }
            for node_id, state in self.nodes.items()
            if state["status"] == "scheduled" and state.get("child_run_id")
        ]

    def pending_deliveries(self) -> dict[str, dict[str, Any]]:
        """Notification deliveries not yet delivered nor given up (to arm again on start)."""
        return {k: d for k, d in (self.notifications or {}).items() if d["outcome"] == PENDING}

    def unfinished_attempts(self) -> list[dict[str, Any]]:
        """Attempts scheduled for an executor and not yet finished (to dispatch again on start)."""
        result = []
        for node_id, state in [*self.nodes.items(), *self.steps.items()]:
            if state["status"] != "scheduled" or not self._takes(node_id):
                continue
            node = self._node(node_id)
            if node.type not in ENGINE_TYPES:
                result.append(
                    {
                        "node": node,
                        "attempt": state["attempt"],
                        "attempt_id": state["attempt_id"],
                        "inputs": state["inputs"],
                    }
                )
        return result


def _as_time(value: Any) -> dt.datetime:
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ExpressionError(f"{value!r} is not an RFC 3339 time") from None
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    raise ExpressionError(f"until must give a time, got {type(value).__name__}")


def _attempt_inputs(node: Node, context: dict[str, Any]) -> dict[str, Any]:
    """An executor's inputs: the node's expressions evaluated; an error names the config field."""
    if node.type == "kafka":
        config = node.typed_config()
        fields = {"value": config.value} if config.key is None else {"key": config.key, "value": config.value}
        try:
            message = evaluate_mapping(fields, context)
        except ExpressionError as exc:
            raise ExpressionError(f"config.{exc}") from None
        try:
            return {**message, "headers": evaluate_mapping(config.headers, context)}
        except ExpressionError as exc:
            raise ExpressionError(f"config.headers.{exc}") from None
    try:
        return evaluate_mapping(node.config.get("inputs", {}), context)
    except ExpressionError as exc:
        raise ExpressionError(f"config.inputs.{exc}") from None


def _evaluate_inline(node: Node, context: dict[str, Any]) -> Any:
    config = node.typed_config()
    if node.type == "transform":
        if isinstance(config.output, str):
            return evaluate(config.output, context)
        return evaluate_mapping(config.output, context)
    if node.type == "condition":
        value = evaluate(config.expression, context)
        if not isinstance(value, bool):
            raise ExpressionError(f"condition must be a boolean, got {type(value).__name__}")
        return {"result": value}
    message = evaluate(config.message, context)
    return {
        "message": message if isinstance(message, str) else orjson.dumps(message).decode(),
        "level": config.level,
    }
