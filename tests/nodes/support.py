"""What the executor tests share: a task for some code, and an executor started for a block."""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from nodes.base import NodeExecutor
from schemas.tasks import NodeTask

E = TypeVar("E", bound=NodeExecutor)


def make_task(code: str, node_type: str = "python", node_id: str = "step", **fields: Any) -> NodeTask:
    config = {"code": textwrap.dedent(code)}
    config.update(fields.pop("config", {}))
    values: dict[str, Any] = {
        "run_id": "run-1",
        "tenant": "acme",
        "workflow": "wf",
        "node_id": node_id,
        "node_type": node_type,
        "attempt": 1,
        "attempt_id": f"run-1/{node_id}/1",
        "config": config,
        "inputs": {},
        "timeout_seconds": 5.0,
    }
    values.update(fields)
    return NodeTask(**values)


@asynccontextmanager
async def started(executor: E) -> AsyncIterator[E]:
    await executor.start()
    try:
        yield executor
    finally:
        await executor.stop()


def runs_command(marker: str) -> bool:
    """True while some process, in any PID namespace, has `marker` in its command line."""
    for entry in Path("/proc").iterdir():
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> bool:
    """Whether `condition` holds within `within` seconds: a wait for a state, not for a time."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()
