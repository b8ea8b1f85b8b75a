"""The contract between the engine and a node executor: one attempt in, one outcome out."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from schemas.values import MAX_DEPTH, ValueOutOfBounds, check_value, printable


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

    def recordable(self, node_id: str) -> NodeOutcome:
        """This outcome as the engine can record it: output past the engine's limits for JSON
        values fails the attempt (error class ResultNotRecordable), and text that could not be
        encoded (lone surrogates) is mended, so no run waits on a result that cannot be stored."""
        stdout, stderr = printable(self.stdout), printable(self.stderr)
        if not self.ok:
            message = printable(self.error_message or "")
            return self.model_copy(update={"error_message": message, "stdout": stdout, "stderr": stderr})
        try:
            check_value(self.output, "output")
        except ValueOutOfBounds as exc:
            return NodeOutcome.failure(
                "ResultNotRecordable",
                f"node {node_id!r} returned a result the engine cannot record, at {exc}; return "
                f"integers within 64 bits, finite numbers, text without lone surrogates, and at most "
                f"{MAX_DEPTH} levels of nesting",
                self.duration_ms,
                stdout,
                stderr,
            )
        return self.model_copy(update={"stdout": stdout, "stderr": stderr})
