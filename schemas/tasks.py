"""The contract between the engine and a node executor: one attempt in, one outcome out."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class NodeTask(BaseModel):
    """One attempt of one node, as carried on `citadel.node-tasks`.

    Inputs are already resolved to JSON values by the decide step, so an executor
    never evaluates workflow expressions and never sees another node's data.
    """

    model_config = ConfigDict(frozen=True)

    run_id: str
    tenant: str
    workflow: str
    node_id: str
    node_type: str
    attempt: int = Field(ge=1)
    attempt_id: str
    config: dict[str, Any]
    inputs: dict[str, Any]
    timeout_seconds: float = Field(gt=0)


class NodeOutcome(BaseModel):
    """What an executor reports for one attempt."""

    ok: bool
    output: Any = None
    error_class: str | None = None
    error_message: str | None = None
    stdout: str = ""
    stderr: str = ""
    duration_ms: float = 0.0

    @classmethod
    def success(cls, output: Any, duration_ms: float, stdout: str = "", stderr: str = "") -> NodeOutcome:
        return cls(ok=True, output=output, duration_ms=duration_ms, stdout=stdout, stderr=stderr)

    @classmethod
    def failure(
        cls,
        error_class: str,
        message: str,
        duration_ms: float = 0.0,
        stdout: str = "",
        stderr: str = "",
    ) -> NodeOutcome:
        return cls(
            ok=False,
            error_class=error_class,
            error_message=message,
            duration_ms=duration_ms,
            stdout=stdout,
            stderr=stderr,
        )
