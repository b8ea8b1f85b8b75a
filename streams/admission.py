"""Admission of node attempts to the executors: in-flight limits per tenant, workflow and node type.

The outbox (one publisher per store) offers every attempt here before it dispatches it. An
attempt within every limit goes at once; one over a limit waits, parked in its tenant's queue,
until an attempt ends (its result, or its run's end) and frees a slot. Waiting attempts are
released round-robin across tenants, oldest first within a tenant, so a tenant that floods the
engine waits behind its own backlog while another tenant's attempts still go.

A parked attempt keeps only its identity and the version of its NodeScheduled event, never the
task (config and inputs can be large): the engine loads the task from the store on release.
Nothing here is durable: the events are, and `reconcile` offers every unfinished attempt again
after a restart, so the limits hold and nothing parked is lost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """How many attempts may be in flight (dispatched and not ended) at once; None: no limit.

    `workflow` applies to each workflow of each tenant; `node_types` maps a node type to its limit.
    """

    tenant: int | None = None
    workflow: int | None = None
    node_types: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        named = {"tenant": self.tenant, "workflow": self.workflow}
        named.update({f"node type {t!r}": n for t, n in self.node_types.items()})
        for what, limit in named.items():
            if limit is not None and limit < 1:
                raise ValueError(f"the {what} concurrency limit is {limit}; use a number >= 1 or no limit")


@dataclass(slots=True, eq=False)
class Attempt:
    """A node attempt as admission sees it: who it belongs to and where its task is stored."""

    run_id: str
    attempt_id: str
    tenant: str
    workflow: str
    node_type: str
    version: int  # of the run's NodeScheduled event, which holds the task
    parked: bool = False
    order: int = 0


class Admission:
    """Counts attempts in flight per key, parks what is over a limit, and releases it fairly."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._known: dict[str, dict[str, Attempt]] = {}  # run id -> attempt id -> attempt
        # In flight per key: ("tenant", t), ("workflow", t, w), ("type", node type).
        self._counts: dict[tuple[str, ...], int] = {}
        self._queues: dict[str, _TenantQueue] = {}  # tenants with parked attempts
        self._turns: deque[str] = deque()  # the same tenants, in round-robin order
        self._arrivals = 0
        self.in_flight = 0
        self.parked = 0

    def offer(self, attempt: Attempt) -> bool:
        """True if the attempt may be dispatched now, False if it waits.

        An attempt offered again (its event republished after a failed batch or a restart) is
        not counted twice: in flight, it is dispatched again, as a failed batch may not have
        delivered it (at least once); waiting, it still waits.
        """
        run = self._known.setdefault(attempt.run_id, {})
        known = run.get(attempt.attempt_id)
        if known is not None:
            return not known.parked
        run[attempt.attempt_id] = attempt
        # Nothing parked is ever admissible (every freed slot is offered to the parked first),
        # so an attempt within its limits overtakes no one.
        if self._admissible(attempt.tenant, attempt.workflow, attempt.node_type):
            self._count(attempt, 1)
            return True
        self._arrivals += 1
        attempt.parked, attempt.order = True, self._arrivals
        queue = self._queues.get(attempt.tenant)
        if queue is None:
            queue = self._queues[attempt.tenant] = _TenantQueue()
            self._turns.append(attempt.tenant)
        queue.lanes.setdefault((attempt.workflow, attempt.node_type), deque()).append(attempt)
        queue.waiting += 1
        self.parked += 1
        return False

    def end(self, run_id: str, attempt_id: str) -> list[Attempt]:
        """The attempt has a result: free its slot. Returns the attempts admitted in its place."""
        run = self._known.get(run_id)
        attempt = run.pop(attempt_id, None) if run is not None else None
        if attempt is None:
            return []
        if not run:
            del self._known[run_id]
        return self._forget([attempt])

    def end_run(self, run_id: str) -> list[Attempt]:
        """The run ended: none of its attempts will report. Returns the attempts admitted instead."""
        run = self._known.pop(run_id, None)
        return self._forget(run.values()) if run else []

    def waiting(self, tenant: str) -> int:
        queue = self._queues.get(tenant)
        return queue.waiting if queue is not None else 0

    # ---- internals -------------------------------------------------------

    def _forget(self, attempts: Iterable[Attempt]) -> list[Attempt]:
        freed = False
        for attempt in attempts:
            if attempt.parked:
                # Left in its lane and skipped there: removing from the middle of a deque costs
                # its length, and the tenant's queue goes as a whole once nothing live waits.
                attempt.parked = False
                self.parked -= 1
                queue = self._queues[attempt.tenant]
                queue.waiting -= 1
                if not queue.waiting:
                    del self._queues[attempt.tenant]
                    self._turns.remove(attempt.tenant)
            else:
                self._count(attempt, -1)
                freed = True
        return self._release() if freed else []

    def _release(self) -> list[Attempt]:
        """Admit parked attempts while any fits: one per tenant in turn, oldest first."""
        admitted: list[Attempt] = []
        passed = 0  # tenants asked in a row that had nothing admissible
        turns = self._turns
        while turns and passed < len(turns):
            tenant = turns[0]
            queue = self._queues[tenant]
            attempt = self._next_of(tenant, queue)
            if attempt is None:
                turns.rotate(-1)
                passed += 1
                continue
            passed = 0
            attempt.parked = False
            self.parked -= 1
            queue.waiting -= 1
            self._count(attempt, 1)
            admitted.append(attempt)
            if queue.waiting:
                turns.rotate(-1)
            else:
                turns.popleft()
                del self._queues[tenant]
        return admitted

    def _next_of(self, tenant: str, queue: _TenantQueue) -> Attempt | None:
        """Take the tenant's oldest parked attempt that fits its limits now, if there is one."""
        if not self._below(("tenant", tenant), self.limits.tenant):
            return None
        best: deque[Attempt] | None = None
        for (workflow, node_type), lane in list(queue.lanes.items()):
            while lane and not lane[0].parked:
                lane.popleft()  # ended while it waited
            if not lane:
                del queue.lanes[(workflow, node_type)]
            elif (best is None or lane[0].order < best[0].order) and self._admissible(
                tenant, workflow, node_type
            ):
                best = lane
        return best.popleft() if best is not None else None

    def _admissible(self, tenant: str, workflow: str, node_type: str) -> bool:
        limits = self.limits
        return (
            self._below(("tenant", tenant), limits.tenant)
            and self._below(("workflow", tenant, workflow), limits.workflow)
            and self._below(("type", node_type), limits.node_types.get(node_type))
        )

    def _below(self, key: tuple[str, ...], limit: int | None) -> bool:
        return limit is None or self._counts.get(key, 0) < limit

    def _count(self, attempt: Attempt, step: int) -> None:
        self.in_flight += step
        counts = self._counts
        for key in (
            ("tenant", attempt.tenant),
            ("workflow", attempt.tenant, attempt.workflow),
            ("type", attempt.node_type),
        ):
            count = counts.get(key, 0) + step
            if count:
                counts[key] = count
            else:
                del counts[key]


class _TenantQueue:
    """One tenant's parked attempts: a FIFO lane per (workflow, node type), so an attempt held
    back by one workflow's or type's limit does not hold back the tenant's others."""

    __slots__ = ("lanes", "waiting")

    def __init__(self) -> None:
        self.lanes: dict[tuple[str, str], deque[Attempt]] = {}
        self.waiting = 0
