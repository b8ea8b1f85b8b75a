"""The pluggable node-executor interface and the registry that dispatches attempts by node type."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from schemas.tasks import NodeOutcome, NodeTask


class NodeExecutor(Protocol):
    """Runs attempts of the node types it names.

    `execute` never raises for anything the node's code or config does: every problem
    is reported as `NodeOutcome.failure(error_class, message)`.
    """

    node_types: tuple[str, ...]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def execute(self, task: NodeTask) -> NodeOutcome: ...


class DuplicateNodeType(ValueError):
    """Two executors claim the same node type."""

    def __init__(self, node_type: str) -> None:
        super().__init__(
            f"node type {node_type!r} is already handled by another executor; "
            "register exactly one executor per node type"
        )
        self.node_type = node_type


class ExecutorRegistry:
    """Maps node types to executors, starts and stops them together, and dispatches attempts."""

    def __init__(self, executors: Iterable[NodeExecutor] = ()) -> None:
        self._executors: list[NodeExecutor] = []
        self._by_type: dict[str, NodeExecutor] = {}
        for executor in executors:
            self.register(executor)

    def register(self, executor: NodeExecutor) -> None:
        for node_type in executor.node_types:
            if node_type in self._by_type:
                raise DuplicateNodeType(node_type)
        self._executors.append(executor)
        self._by_type.update(dict.fromkeys(executor.node_types, executor))

    @property
    def node_types(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_type))

    async def start(self) -> None:
        """Start every executor; if one fails, stop those already started and re-raise."""
        started: list[NodeExecutor] = []
        try:
            for executor in self._executors:
                await executor.start()
                started.append(executor)
        except BaseException:
            await _stop_all(reversed(started))
            raise

    async def stop(self) -> None:
        """Stop every executor, in reverse start order, even if one of them fails."""
        await _stop_all(reversed(self._executors))

    async def execute(self, task: NodeTask) -> NodeOutcome:
        executor = self._by_type.get(task.node_type)
        if executor is None:
            known = ", ".join(self.node_types) or "none"
            return NodeOutcome.failure(
                "UnknownNodeType",
                f"node {task.node_id!r} has type {task.node_type!r}, which no executor "
                f"handles (known types: {known})",
            )
        try:
            return await executor.execute(task)
        except Exception as exc:
            # An executor bug must fail this attempt, not the worker that runs all attempts.
            return NodeOutcome.failure(
                "ExecutorError",
                f"the {task.node_type!r} executor failed on node {task.node_id!r}: {exc!r}",
            )


async def _stop_all(executors: Iterable[NodeExecutor]) -> None:
    first_error: BaseException | None = None
    for executor in executors:
        try:
            await executor.stop()
        except Exception as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
